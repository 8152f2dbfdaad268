"""The Chicago taxi pipeline: tips > 20% of fare, from raw CSV to a pushed model, in one Beam graph.

Run with `beam-pipeline run examples/chicago_taxi/pipeline.py` (add any Beam option, e.g. --runner).
"""

from __future__ import annotations

import os

from beam_pipeline import Pipeline
from transforms.example_gen import ExampleGen
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "data.csv")


def create_pipeline(
    pipeline_root: str = os.environ.get("PIPELINE_ROOT", os.path.join(os.getcwd(), "pipelines", "chicago_taxi")),
    data_path: str = DATA,
) -> Pipeline:
    example_gen = ExampleGen(input_base=data_path)
    statistics_gen = StatisticsGen(examples=example_gen.outputs.examples)
    schema_gen = SchemaGen(statistics=statistics_gen.outputs.statistics)
    example_validator = ExampleValidator(
        statistics=statistics_gen.outputs.statistics,
        schema=schema_gen.outputs.schema,
        drift_comparators={"payment_type": 0.1, "company": 0.2},
    )
    return Pipeline(
        "chicago_taxi",
        pipeline_root,
        [example_gen, statistics_gen, schema_gen, example_validator],
    )
