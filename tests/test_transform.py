"""Transform component on a few hundred taxi rows, applied alone in a DirectRunner pipeline."""

from __future__ import annotations

import csv
import glob
import itertools
import os
import textwrap
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from tensorflow_metadata.proto.v0 import schema_pb2

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import Artifact
from beam_pipeline.compiler import ComponentPlan, _commit_factory
from beam_pipeline.dsl import Channel, Component, ComponentContext
from beam_pipeline.errors import InputDataError, UserModuleError
from tests.helpers import in_process_pipeline
from transforms import _example_io
from transforms.example_gen import ExampleGen
from transforms.schema_gen import SchemaGen
from transforms.transform import Transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_CSV = os.path.join(ROOT, "examples", "chicago_taxi", "data", "data.csv")
TAXI_MODULE = os.path.join(ROOT, "examples", "chicago_taxi", "taxi_utils.py")


# -- harness shared with test_trainer ----------------------------------------------------------------


def taxi_batches(tmp_dir: str, rows: int = 300) -> tuple[dict[str, pa.RecordBatch], pa.Schema]:
    """The first `rows` taxi rows parsed as ExampleGen does, 2/3 train and 1/3 eval."""
    path = os.path.join(tmp_dir, "taxi_sample.csv")
    with open(TAXI_CSV) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            if i > rows:
                break
            dst.write(line)
    flat = _example_io.infer_csv_types([path])
    table, _ = _example_io.parse_csv_block(path, 0, os.path.getsize(path), flat, "error")
    batch = _example_io.to_list_batch(table)
    cut = batch.num_rows * 2 // 3
    return {"train": batch.slice(0, cut), "eval": batch.slice(cut)}, batch.schema


def channels() -> tuple[Channel, Channel]:
    """Typed channels for constructing a component outside a pipeline."""
    gen = ExampleGen(input_base=TAXI_CSV)
    return gen.outputs.examples, SchemaGen(statistics=_statistics_channel(gen)).outputs.schema


def _statistics_channel(gen: ExampleGen) -> Channel:
    from transforms.statistics_gen import StatisticsGen

    return StatisticsGen(examples=gen.outputs.examples).outputs.statistics


def run_component(
    component: Component,
    make_inputs: Callable[[beam.Pipeline], tuple[dict[str, Any], dict[str, Any]]],
    input_static: dict[str, dict[str, Any]],
    out_dir: str,
    resolved: dict[str, Any] | None = None,
    check: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, Artifact]:
    """Apply `component` alone, with the compiler's commit step; returns its committed artifacts."""
    static = component.static_outputs(input_static)
    uris = {out: os.path.join(out_dir, component.id, out) for out in component.OUTPUTS}
    plan = ComponentPlan(component, static, resolved or {}, output_uris=uris)
    with in_process_pipeline() as p:
        inputs, committed = make_inputs(p)
        component.bind(
            ComponentContext(
                pipeline_name="test",
                pipeline_root=out_dir,
                run_id="run",
                execution_id=1,
                output_uris=uris,
                input_static=input_static,
                output_static=static,
                resolved=resolved or {},
                committed_inputs=committed,
                commit_factory=_commit_factory(p, component, plan, "test"),
            )
        )
        try:
            result = inputs | component
        finally:
            component.bind(None)
        if check:
            check(result or {}, static)
    artifacts = {}
    for out, uri in uris.items():
        marker = artifact_io.read_marker(uri)
        assert marker is not None, f"{out} was not committed"
        artifacts[out] = Artifact(component.OUTPUTS[out], uri, marker["properties"])
    return artifacts


def run_transform(
    tmp_dir: str,
    module_file: str = TAXI_MODULE,
    curated: schema_pb2.Schema | None = None,
    drop_columns: tuple[str, ...] = (),
    check: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    **params: Any,
) -> tuple[Transform, dict[str, Artifact]]:
    batches, arrow_schema = taxi_batches(tmp_dir)
    keep = [n for n in arrow_schema.names if n not in drop_columns]
    batches = {s: pa.RecordBatch.from_arrays([b.column(n) for n in keep], names=keep) for s, b in batches.items()}
    arrow_schema = pa.schema([arrow_schema.field(n) for n in keep])
    examples, schema = channels()
    component = Transform(examples=examples, schema=schema, module_file=module_file, **params)
    input_static = {
        "examples": {"arrow_schema": arrow_schema, "splits": ["train", "eval"]},
        "schema": {"schema": curated},
    }

    def make_inputs(p):
        inputs = {
            "examples": {s: p | f"Raw[{s}]" >> beam.Create([b]) for s, b in batches.items()},
            "schema": p | "Schema" >> beam.Create([curated or schema_pb2.Schema()]),
        }
        return inputs, {}

    return component, run_component(component, make_inputs, input_static, tmp_dir, check=check)


def write_module(tmp_dir: str, source: str) -> str:
    path = os.path.join(tmp_dir, "user_module.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    return path


def read_transformed(artifact: Artifact, split: str, feature_spec: dict) -> dict[str, np.ndarray]:
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(artifact.split_uri(split), "*.gz")))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(100000)
    parsed = [tf.io.parse_example(b, feature_spec) for b in ds]
    return {k: np.concatenate([p[k].numpy() for p in parsed]) for k in feature_spec}


def expected_labels(rows: int = 300) -> int:
    """Number of rows among the first `rows` whose tip exceeds 20% of a known fare (in float32, as TF)."""
    with open(TAXI_CSV) as f:
        sample = list(itertools.islice(csv.DictReader(f), rows))
    f32 = np.float32
    return sum(1 for r in sample if r["fare"] and f32(r["tips"] or 0) > f32(0.2) * f32(r["fare"]))


# -- tests ---------------------------------------------------------------------------------------------


def test_transform_taxi_writes_graph_and_examples(tmp_path):
    import tensorflow_transform as tft

    def check(result, static):
        schema = static["transformed_examples"]["arrow_schema"]
        for split, pcoll in result["transformed_examples"].items():
            _ = pcoll | f"SchemaCheck[{split}]" >> beam.Map(_assert_schema, schema)

    _, artifacts = run_transform(str(tmp_path), check=check)

    graph = artifacts["transform_graph"]
    assert sorted(os.listdir(graph.uri)) == ["_ARTIFACT.json", "metadata", "transform_fn", "transformed_metadata"]
    output = tft.TFTransformOutput(graph.uri)
    assert "tips" in output.raw_feature_spec()
    spec = output.transformed_feature_spec()
    assert spec["tips_xf"].dtype.name == "int64"

    examples = artifacts["transformed_examples"]
    assert examples.properties["split_names"] == ["train", "eval"]
    assert examples.properties["row_counts"] == {"train": 200, "eval": 100}
    assert examples.properties["payload_format"] == "tfrecord_gzip"
    train = read_transformed(examples, "train", spec)
    evaluation = read_transformed(examples, "eval", spec)
    assert len(train["fare_xf"]) == 200 and len(evaluation["fare_xf"]) == 100
    assert abs(float(train["fare_xf"].mean())) < 1e-3  # z-score fitted on train
    assert int(train["tips_xf"].sum() + evaluation["tips_xf"].sum()) == expected_labels()
    assert train["trip_start_hour_xf"].max() <= 24
    assert train["company_xf"].max() <= 1010


def _assert_schema(batch: pa.RecordBatch, schema: pa.Schema) -> None:
    assert batch.schema.equals(schema), (batch.schema, schema)


def test_transform_with_curated_dense_schema(tmp_path):
    """Features declared FixedLen by a curated schema arrive dense; the taxi module handles both."""
    curated = schema_pb2.Schema()
    _, arrow_schema = taxi_batches(str(tmp_path))
    for name in arrow_schema.names:
        feature = curated.feature.add(name=name)
        value_type = arrow_schema.field(name).type.value_type
        feature.type = {pa.int64(): schema_pb2.INT, pa.float32(): schema_pb2.FLOAT}.get(value_type, schema_pb2.BYTES)
        if name in ("trip_start_hour", "trip_start_day", "trip_start_month"):
            feature.presence.min_fraction = 1.0
            feature.shape.dim.add(size=1)
    _, artifacts = run_transform(str(tmp_path), curated=curated)
    import tensorflow_transform as tft

    output = tft.TFTransformOutput(artifacts["transform_graph"].uri)
    assert output.raw_feature_spec()["trip_start_hour"].shape == [1]
    hours = read_transformed(artifacts["transformed_examples"], "train", output.transformed_feature_spec())
    assert 0 <= hours["trip_start_hour_xf"].min() and hours["trip_start_hour_xf"].max() < 24


def test_materialize_off_writes_no_examples(tmp_path):
    _, artifacts = run_transform(str(tmp_path), materialize=False)
    examples = artifacts["transformed_examples"]
    assert examples.properties["payload_format"] is None
    assert examples.properties["row_counts"] == {"train": 200, "eval": 100}
    assert not glob.glob(os.path.join(examples.uri, "Split-*", "*"))


def test_missing_module_file_fails_at_definition(tmp_path):
    examples, schema = channels()
    with pytest.raises(UserModuleError, match="does not exist"):
        Transform(examples=examples, schema=schema, module_file=str(tmp_path / "nope.py"))


def test_module_without_preprocessing_fn(tmp_path):
    module = write_module(str(tmp_path), "def run_fn(fn_args):\n    pass\n")
    examples, schema = channels()
    with pytest.raises(UserModuleError, match=r"user_module\.py does not define a function preprocessing_fn"):
        Transform(examples=examples, schema=schema, module_file=module)


def test_module_that_fails_to_import(tmp_path):
    module = write_module(str(tmp_path), "import no_such_package_xyz\n")
    examples, schema = channels()
    with pytest.raises(UserModuleError, match="ModuleNotFoundError"):
        Transform(examples=examples, schema=schema, module_file=module)


def test_preprocessing_fn_raising_is_reported_at_compile_time(tmp_path):
    module = write_module(
        str(tmp_path),
        """
        def preprocessing_fn(inputs):
            raise ValueError("bad scaling choice")
        """,
    )
    with pytest.raises(UserModuleError, match=r"user_module\.py raised ValueError: bad scaling choice"):
        run_transform(str(tmp_path), module_file=module)


def test_label_column_missing_from_data(tmp_path):
    with pytest.raises(InputDataError, match=r"reads column 'tips', which the examples do not have"):
        run_transform(str(tmp_path), drop_columns=("tips",))


def test_unknown_split_is_a_definition_error(tmp_path):
    from beam_pipeline.errors import PipelineDefinitionError

    with pytest.raises(PipelineDefinitionError, match=r"splits \['test'\]"):
        run_transform(str(tmp_path), analyze_splits=["test"])
