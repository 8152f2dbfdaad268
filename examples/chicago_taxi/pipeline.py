"""The Chicago taxi pipeline: will the tip exceed 20% of the fare? From raw CSV to a pushed model, in one Beam graph.

Run with `beam-pipeline run examples/chicago_taxi/pipeline.py` and add any Beam option (e.g. --runner).
Environment knobs: PIPELINE_ROOT, TAXI_DATA (a CSV path or glob), TAXI_TRAIN_STEPS, SERVING_MODEL_DIR.
The root may be on an object store (`--pipeline-root s3://bucket/root`); ML Metadata then needs
`--metadata-uri` (a local SQLite path or mysql://...), as SQLite cannot live there.
"""

from __future__ import annotations

import os

from beam_pipeline import Pipeline
from transforms.evaluator import Evaluator, binary_classification_eval_config
from transforms.example_gen import ExampleGen, RangeConfig
from transforms.example_validator import ExampleValidator
from transforms.pusher import Pusher
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.trainer import Trainer
from transforms.transform import Transform

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_FILE = os.path.join(HERE, "taxi_utils.py")
DEFAULT_ROOT = os.path.join(os.getcwd(), "pipelines", "chicago_taxi")


def create_pipeline(
    pipeline_root: str = os.environ.get("PIPELINE_ROOT", DEFAULT_ROOT),
    data_path: str = os.environ.get("TAXI_DATA", os.path.join(HERE, "data", "data.csv")),
    train_steps: int = int(os.environ.get("TAXI_TRAIN_STEPS", "1000")),
    serving_model_dir: str | None = os.environ.get("SERVING_MODEL_DIR"),
    module_file: str = MODULE_FILE,
    range_config: RangeConfig | None = None,
    name: str = "chicago_taxi",
    warm_start: bool = False,
) -> Pipeline:
    example_gen = ExampleGen(input_base=data_path, range_config=range_config)
    statistics_gen = StatisticsGen(examples=example_gen.outputs.examples)
    schema_gen = SchemaGen(statistics=statistics_gen.outputs.statistics)
    example_validator = ExampleValidator(
        statistics=statistics_gen.outputs.statistics,
        schema=schema_gen.outputs.schema,
        drift_comparators={"payment_type": 0.1, "company": 0.2},
    )
    transform = Transform(
        examples=example_gen.outputs.examples,
        schema=schema_gen.outputs.schema,
        module_file=module_file,
    )
    trainer = Trainer(
        examples=transform.outputs.transformed_examples,
        transform_graph=transform.outputs.transform_graph,
        schema=schema_gen.outputs.schema,
        module_file=module_file,
        train_steps=train_steps,
        eval_steps=100,
        warm_start=warm_start,
    )
    evaluator = Evaluator(
        examples=example_gen.outputs.examples,
        model=trainer.outputs.model,
        eval_config=binary_classification_eval_config(
            "tips_xf",
            slice_features=["trip_start_hour"],
            lower_bounds={"auc": 0.85, "binary_accuracy": 0.7},
            max_regression={"auc": 0.01},
        ),
    )
    pusher = Pusher(
        model=trainer.outputs.model,
        blessing=evaluator.outputs.blessing,
        serving_model_dir=serving_model_dir or os.path.join(pipeline_root, "serving_model"),
    )
    return Pipeline(
        name,
        pipeline_root,
        [example_gen, statistics_gen, schema_gen, example_validator, transform, trainer, evaluator, pusher],
    )
