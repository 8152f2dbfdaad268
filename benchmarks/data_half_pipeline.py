"""The taxi pipeline's data half and Transform (ExampleGen → StatisticsGen → SchemaGen → ExampleValidator → Transform).

A pipeline file for `beam-pipeline run`, used by `bounded_memory.py` and `window_rerun.py`; TAXI_DATA
names the CSV (or a pattern with {SPAN}) and PIPELINE_ROOT the root, as in examples/chicago_taxi/pipeline.py;
TAXI_WINDOW=N reads a rolling window of the newest N spans.
"""

from __future__ import annotations

import os

from beam_pipeline import Pipeline
from transforms.example_gen import ExampleGen, RangeConfig
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.transform import Transform

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_FILE = os.path.join(os.path.dirname(HERE), "examples", "chicago_taxi", "taxi_utils.py")


def create_pipeline(pipeline_root: str = os.environ.get("PIPELINE_ROOT", "")) -> Pipeline:
    window = int(os.environ.get("TAXI_WINDOW", "0"))
    example_gen = ExampleGen(
        input_base=os.environ["TAXI_DATA"], range_config=RangeConfig.rolling(window) if window else None
    )
    statistics_gen = StatisticsGen(examples=example_gen.outputs.examples)
    schema_gen = SchemaGen(statistics=statistics_gen.outputs.statistics)
    example_validator = ExampleValidator(statistics=statistics_gen.outputs.statistics, schema=schema_gen.outputs.schema)
    transform = Transform(
        examples=example_gen.outputs.examples, schema=schema_gen.outputs.schema, module_file=MODULE_FILE
    )
    return Pipeline(
        "taxi-data-half", pipeline_root, [example_gen, statistics_gen, schema_gen, example_validator, transform]
    )
