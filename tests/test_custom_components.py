"""Custom components in a real taxi pipeline: a PTransform over RecordBatches and a Python function component."""

from __future__ import annotations

import glob
import os

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tensorflow_transform as tft
from tensorflow_metadata.proto.v0 import statistics_pb2

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, MODEL, SCHEMA, TRANSFORM_GRAPH
from beam_pipeline.errors import PipelineDefinitionError, UserModuleError
from beam_pipeline.examples_component import ExamplesComponent
from beam_pipeline.function_component import Input, Output, component
from tests.helpers import run_components, store_at
from tests.test_transform import TAXI_MODULE, taxi_sample, write_module
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.trainer import Trainer
from transforms.transform import Transform

FILTER_MODULE = """
import apache_beam as beam
import pyarrow.compute as pc


def drop_short_trips(min_miles=1.0):
    def keep(batch):
        miles = pc.list_flatten(batch["trip_miles"])  # one value per row: the column has no missing values
        return batch.filter(pc.greater_equal(miles, min_miles))

    return beam.Map(keep)


def not_a_transform():
    return 42
"""


@component
def TransformedSchema(transform_graph: Input[TRANSFORM_GRAPH], schema: Output[SCHEMA], note: str = "") -> None:
    """The schema of the transformed features, from the transform graph: what the Trainer reads."""
    output = tft.TFTransformOutput(transform_graph.uri)
    path = artifact_io.join(schema.uri, artifact_io.SCHEMA_FILE)
    from google.protobuf import text_format

    artifact_io.write_text(path, text_format.MessageToString(output.transformed_metadata.schema))
    schema.properties["feature_count"] = len(output.transformed_metadata.schema.feature)
    schema.properties["note"] = note


def _pipeline(data: str, module: str, note: str = "") -> list:
    from transforms.example_gen import ExampleGen

    gen = ExampleGen(input_base=data)
    long_trips = ExamplesComponent(
        examples=gen.outputs.examples,
        module_file=module,
        transform="drop_short_trips",
        params={"min_miles": 1.0},
        component_id="LongTrips",
    )
    stats = StatisticsGen(examples=long_trips.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    transform = Transform(examples=long_trips.outputs.examples, schema=schema.outputs.schema, module_file=TAXI_MODULE)
    transformed_schema = TransformedSchema(transform_graph=transform.outputs.transform_graph, note=note)
    trainer = Trainer(
        examples=transform.outputs.transformed_examples,
        transform_graph=transform.outputs.transform_graph,
        schema=transformed_schema.outputs.schema,
        module_file=TAXI_MODULE,
        train_steps=5,
        eval_steps=2,
    )
    return [gen, long_trips, stats, schema, transform, transformed_schema, trainer]


@pytest.mark.slow
def test_custom_components_run_cache_and_feed_the_built_ins(tmp_path):
    data = taxi_sample(str(tmp_path / "taxi.csv"), 600)
    module = write_module(str(tmp_path), FILTER_MODULE, "filters.py")
    root = tmp_path / "root"
    first = run_components(root, _pipeline(data, module), name="custom")

    read, kept = first.artifact("ExampleGen", "examples"), first.artifact("LongTrips", "examples")
    assert sum(kept.properties["row_counts"].values()) < sum(read.properties["row_counts"].values())
    for split in ("train", "eval"):
        files = glob.glob(os.path.join(kept.split_uri(split), "*.parquet"))
        miles = pc.list_flatten(pq.read_table(files).column("trip_miles"))
        assert len(miles) == kept.properties["row_counts"][split] and pc.min(miles).as_py() >= 1.0
    stats_uri = first.artifact("StatisticsGen", "statistics").uri
    train_stats = artifact_io.read_proto(
        artifact_io.split_file(stats_uri, "train", artifact_io.STATS_FILE),
        statistics_pb2.DatasetFeatureStatisticsList,
    )
    assert train_stats.datasets[0].num_examples == kept.properties["row_counts"]["train"]

    schema = first.artifact("TransformedSchema", "schema")
    assert schema.properties["feature_count"] >= 10 and os.path.exists(os.path.join(schema.uri, "schema.pbtxt"))
    trainer_inputs, _ = store_at(root).execution_artifacts(first.components["Trainer"].execution_id)
    assert [a.id for a in trainer_inputs["schema"]] == [schema.id]
    assert os.path.exists(os.path.join(first.artifact("Trainer", "model").uri, "Format-Serving", "saved_model.pb"))

    again = run_components(root, _pipeline(data, module), name="custom")
    assert {c.state for c in again.components.values()} == {"CACHED"}

    # A new parameter of the function component reruns it and what depends on it, nothing upstream.
    noted = run_components(root, _pipeline(data, module, note="v2"), name="custom")
    states = {n: c.state for n, c in noted.components.items()}
    assert states["TransformedSchema"] == states["Trainer"] == "COMPLETE"
    assert {states[n] for n in ("ExampleGen", "LongTrips", "StatisticsGen", "SchemaGen", "Transform")} == {"CACHED"}
    assert noted.artifact("TransformedSchema", "schema").properties["note"] == "v2"


def test_custom_component_definitions_are_checked_when_written(tmp_path):
    module = write_module(str(tmp_path), FILTER_MODULE, "filters.py")
    from transforms.example_gen import ExampleGen

    gen = ExampleGen(input_base=taxi_sample(str(tmp_path / "taxi.csv"), 50))
    with pytest.raises(UserModuleError, match=r"does not define|no_such"):
        ExamplesComponent(examples=gen.outputs.examples, module_file=module, transform="no_such")
    with pytest.raises(PipelineDefinitionError, match="declare at least one Output"):

        @component
        def NoOutputs(model: Input[MODEL]) -> None:
            pass

    with pytest.raises(PipelineDefinitionError, match="holds per-split data"):

        @component
        def MakesExamples(model: Input[MODEL], examples: Output[EXAMPLES]) -> None:
            pass

    with pytest.raises(PipelineDefinitionError, match="unknown arguments \\['modle'\\]"):
        TransformedSchema(modle=None)


@pytest.mark.slow
def test_an_examples_transform_that_returns_no_ptransform_fails_naming_it(tmp_path):
    module = write_module(str(tmp_path), FILTER_MODULE, "filters.py")
    from transforms.example_gen import ExampleGen

    gen = ExampleGen(input_base=taxi_sample(str(tmp_path / "taxi.csv"), 50))
    bad = ExamplesComponent(examples=gen.outputs.examples, module_file=module, transform="not_a_transform")
    with pytest.raises(UserModuleError, match=r"not_a_transform\(\) in .*filters.py returned int"):
        run_components(tmp_path / "root", [gen, bad])
