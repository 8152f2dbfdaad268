"""Transform component in real pipelines: ExampleGen on a few hundred taxi rows → SchemaGen → Transform."""

from __future__ import annotations

import csv
import glob
import os
import textwrap
from collections.abc import Sequence

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import pyarrow as pa
import pytest
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import Artifact
from beam_pipeline.dsl import Channel, Component
from beam_pipeline.errors import InputDataError, PipelineDefinitionError, UserModuleError
from tests.helpers import run_components
from transforms.example_gen import ExampleGen
from transforms.schema_gen import ImportSchemaGen, SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.transform import Transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_CSV = os.path.join(ROOT, "examples", "chicago_taxi", "data", "data.csv")
TAXI_MODULE = os.path.join(ROOT, "examples", "chicago_taxi", "taxi_utils.py")
ROWS = 300


# -- helpers shared with test_trainer and test_evaluator ----------------------------------------------


def taxi_sample(
    path: str,
    rows: int = ROWS,
    *,
    skip: int = 0,
    drop_columns: Sequence[str] = (),
    extra_column: bool = False,
    whole_numbers: Sequence[str] = (),
) -> str:
    """Write taxi rows skip+1 .. skip+rows of the sample to `path`, optionally without some columns.

    With `extra_column`, columns come in reverse order plus one the model does not know, as a
    next-day export from another system might; `whole_numbers` columns are rounded to integers, so
    an ExampleGen of the file types them INT.
    """
    with open(TAXI_CSV, newline="") as src:
        reader = csv.DictReader(src)
        names = [n for n in reader.fieldnames if n not in drop_columns]
        if extra_column:
            names = ["extra", *reversed(names)]
        with open(path, "w", newline="") as dst:
            writer = csv.DictWriter(dst, names, extrasaction="ignore")
            writer.writeheader()
            for i, row in enumerate(reader):
                if i >= skip + rows:
                    break
                if i >= skip:
                    rounded = {n: str(round(float(row[n]))) for n in whole_numbers if row[n]}
                    writer.writerow({**row, **rounded, "extra": "zzz"})
    return path


def upstream(data: str, schema_file: str | None = None) -> tuple[ExampleGen, list[Component]]:
    """ExampleGen → StatisticsGen → SchemaGen (or ImportSchemaGen of `schema_file`) definitions."""
    gen = ExampleGen(input_base=data)
    if schema_file:
        return gen, [gen, ImportSchemaGen(schema_file=schema_file)]
    stats = StatisticsGen(examples=gen.outputs.examples)
    return gen, [gen, stats, SchemaGen(statistics=stats.outputs.statistics)]


def taxi_components(data: str, module_file: str = TAXI_MODULE, schema_file: str | None = None, **params) -> list:
    """A fresh pipeline definition up to Transform (a component is bound to the graph it was applied to)."""
    gen, components = upstream(data, schema_file)
    transform = Transform(
        examples=gen.outputs.examples, schema=components[-1].outputs.schema, module_file=module_file, **params
    )
    return [*components, transform]


def channels() -> tuple[Channel, Channel]:
    """Typed channels for constructing a component outside a pipeline (definition-time checks)."""
    _, components = upstream(TAXI_CSV)
    return components[0].outputs.examples, components[-1].outputs.schema


def write_module(tmp_dir: str, source: str, name: str = "user_module.py") -> str:
    path = os.path.join(tmp_dir, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    return path


def read_transformed(artifact: Artifact, split: str, feature_spec: dict) -> dict[str, np.ndarray]:
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(artifact.split_uri(split), "*.gz")))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(100000)
    parsed = [tf.io.parse_example(b, feature_spec) for b in ds]
    return {k: np.concatenate([p[k].numpy() for p in parsed]) for k in feature_spec}


def expected_labels(path: str) -> int:
    """Rows of `path` whose tip exceeds 20% of a known fare (in float32, as TF computes it)."""
    with open(path) as f:
        sample = list(csv.DictReader(f))
    f32 = np.float32
    return sum(1 for r in sample if r["fare"] and f32(r["tips"] or 0) > f32(0.2) * f32(r["fare"]))


# -- one real run shared by the tests below --------------------------------------------------------------


@pytest.fixture(scope="module")
def taxi_run(tmp_path_factory):
    """ExampleGen → StatisticsGen → SchemaGen → Transform on 300 rows, in one job with an unmaterialized
    Transform and statistics of the in-graph transformed batches (what a downstream component receives)."""
    tmp = tmp_path_factory.mktemp("transform")
    data = taxi_sample(str(tmp / "taxi.csv"))
    components = taxi_components(data)
    gen, schema, transform = components[0], components[-2], components[-1]
    unmaterialized = Transform(
        examples=gen.outputs.examples,
        schema=schema.outputs.schema,
        module_file=TAXI_MODULE,
        materialize=False,
        component_id="UnmaterializedTransform",
    )
    transformed_stats = StatisticsGen(
        examples=transform.outputs.transformed_examples, component_id="TransformedStatisticsGen"
    )
    result = run_components(tmp / "root", [*components, unmaterialized, transformed_stats], name="taxi")
    return tmp, data, result


def _rerun(taxi_run, **params):
    """A variant of the Transform in the fixture's pipeline root: ExampleGen and SchemaGen are reused."""
    tmp, data, _ = taxi_run
    return run_components(tmp / "root", taxi_components(data, **params), name="taxi")


# -- tests ---------------------------------------------------------------------------------------------


def test_transform_taxi_writes_graph_and_examples(taxi_run):
    import tensorflow_transform as tft

    _, data, result = taxi_run
    graph = result.artifact("Transform", "transform_graph")
    assert sorted(os.listdir(graph.uri)) == ["_ARTIFACT.json", "metadata", "transform_fn", "transformed_metadata"]
    output = tft.TFTransformOutput(graph.uri)
    assert "tips" in output.raw_feature_spec()
    spec = output.transformed_feature_spec()
    assert spec["tips_xf"].dtype.name == "int64"

    raw_counts = result.artifact("ExampleGen", "examples").properties["row_counts"]
    assert sum(raw_counts.values()) == ROWS and min(raw_counts.values()) > 50
    examples = result.artifact("Transform", "transformed_examples")
    assert examples.properties["split_names"] == ["train", "eval"]
    assert examples.properties["row_counts"] == raw_counts
    assert examples.properties["payload_format"] == "tfrecord_gzip"
    train = read_transformed(examples, "train", spec)
    evaluation = read_transformed(examples, "eval", spec)
    assert len(train["fare_xf"]) == raw_counts["train"] and len(evaluation["fare_xf"]) == raw_counts["eval"]
    assert abs(float(train["fare_xf"].mean())) < 1e-3  # z-score fitted on train
    assert int(train["tips_xf"].sum() + evaluation["tips_xf"].sum()) == expected_labels(data)
    assert train["trip_start_hour_xf"].max() <= 24
    assert train["company_xf"].max() <= 1010


def test_in_graph_transformed_batches_carry_the_transformed_features(taxi_run):
    """A downstream component gets the transformed RecordBatches in the graph, with the traced types."""
    import tensorflow_transform as tft

    _, _, result = taxi_run
    spec = tft.TFTransformOutput(result.artifact("Transform", "transform_graph").uri).transformed_feature_spec()
    stats_uri = result.artifact("TransformedStatisticsGen", "statistics").uri
    counts = result.artifact("Transform", "transformed_examples").properties["row_counts"]
    kinds = {"int64": statistics_pb2.FeatureNameStatistics.INT, "float32": statistics_pb2.FeatureNameStatistics.FLOAT}
    for split, rows in counts.items():
        path = artifact_io.split_file(stats_uri, split, artifact_io.STATS_FILE)
        stats = artifact_io.read_proto(path, statistics_pb2.DatasetFeatureStatisticsList)
        dataset = stats.datasets[0]
        assert dataset.num_examples == rows
        types = {f.path.step[0]: f.type for f in dataset.features}
        assert types == {name: kinds[s.dtype.name] for name, s in spec.items()}


def test_transform_with_curated_dense_schema(taxi_run):
    """Features declared FixedLen by a curated schema arrive dense; the taxi module handles both."""
    import tensorflow_transform as tft

    tmp, _, first = taxi_run
    inferred = artifact_io.read_proto(
        artifact_io.join(first.artifact("SchemaGen", "schema").uri, artifact_io.SCHEMA_FILE), schema_pb2.Schema
    )
    curated = schema_pb2.Schema()
    for feature in inferred.feature:
        out = curated.feature.add(name=feature.name, type=feature.type)
        if feature.name in ("trip_start_hour", "trip_start_day", "trip_start_month"):
            out.presence.min_fraction = 1.0
            out.shape.dim.add(size=1)
    schema_file = tmp / "curated_schema.pbtxt"
    schema_file.write_text(text_format.MessageToString(curated))

    result = _rerun(taxi_run, schema_file=str(schema_file))
    assert result.components["ExampleGen"].state == "CACHED"
    output = tft.TFTransformOutput(result.artifact("Transform", "transform_graph").uri)
    assert output.raw_feature_spec()["trip_start_hour"].shape == [1]
    examples = result.artifact("Transform", "transformed_examples")
    hours = read_transformed(examples, "train", output.transformed_feature_spec())
    assert 0 <= hours["trip_start_hour_xf"].min() and hours["trip_start_hour_xf"].max() < 24


def test_materialize_off_writes_no_examples(taxi_run):
    _, _, result = taxi_run
    examples = result.artifact("UnmaterializedTransform", "transformed_examples")
    assert examples.properties["payload_format"] is None
    assert examples.properties["row_counts"] == result.artifact("ExampleGen", "examples").properties["row_counts"]
    assert not glob.glob(os.path.join(examples.uri, "Split-*", "*"))
    graph = result.artifact("UnmaterializedTransform", "transform_graph")
    assert os.path.isdir(os.path.join(graph.uri, "transform_fn"))


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


def test_preprocessing_fn_raising_is_reported_at_compile_time(taxi_run, tmp_path):
    module = write_module(
        str(tmp_path),
        """
        def preprocessing_fn(inputs):
            raise ValueError("bad scaling choice")
        """,
    )
    with pytest.raises(UserModuleError, match=r"user_module\.py raised ValueError: bad scaling choice"):
        _rerun(taxi_run, module_file=module)


def test_label_column_missing_from_data(tmp_path):
    data = taxi_sample(str(tmp_path / "no_tips.csv"), drop_columns=("tips",))
    with pytest.raises(InputDataError, match=r"reads column 'tips', which the examples do not have"):
        run_components(tmp_path / "root", taxi_components(data), name="taxi")


def test_unknown_split_is_a_definition_error(taxi_run):
    with pytest.raises(PipelineDefinitionError, match=r"splits \['test'\]"):
        _rerun(taxi_run, analyze_splits=["test"])


# -- the data work alone, in a bare Beam pipeline ---------------------------------------------------------


def _penguin_batches() -> tuple[pa.RecordBatch, pa.RecordBatch]:
    import pyarrow.csv as pv

    from tests.conftest import PENGUIN_CSV
    from transforms._arrow_layout import to_list_batch

    table = pv.read_csv(PENGUIN_CSV)
    return to_list_batch(table.slice(0, 200)), to_list_batch(table.slice(200))


def test_analyze_and_transform_runs_in_a_bare_beam_pipeline(tmp_path):
    import apache_beam as beam
    import pyarrow.compute as pc
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from apache_beam.testing.util import assert_that

    from tests.helpers import in_process_pipeline
    from transforms.transform import AnalyzeAndTransform

    train, evals = _penguin_batches()

    def preprocessing_fn(inputs):
        return {"culmen_z": tft.scale_to_z_score(inputs["culmen_length_mm"]), "species": inputs["species"]}

    p = in_process_pipeline()
    batches = {"train": p | "Train" >> beam.Create([train]), "eval": p | "Eval" >> beam.Create([evals])}
    transform_fn, transformed = batches | AnalyzeAndTransform(
        preprocessing_fn, train.schema, temp_dir=str(tmp_path / "tmp")
    )
    _ = transform_fn | tft_beam.WriteTransformFn(str(tmp_path / "transform_fn"))
    values = pc.list_flatten(train.column("culmen_length_mm")).to_numpy()
    mean, std = values.mean(), values.std()

    def check(split_batches, expected):
        got = np.concatenate([pc.list_flatten(b.column("culmen_z")).to_numpy() for b in split_batches])
        np.testing.assert_allclose(np.sort(got), np.sort(expected), rtol=1e-4, atol=1e-5)

    # Fitted on train only: eval is scaled with train's mean and deviation.
    for split, batch in (("train", train), ("eval", evals)):
        raw = pc.list_flatten(batch.column("culmen_length_mm")).to_numpy()
        assert_that(transformed[split], lambda bs, raw=raw: check(bs, (raw - mean) / std), label=f"Check[{split}]")
    p.run().wait_until_finish()
    output = tft.TFTransformOutput(str(tmp_path / "transform_fn"))
    assert set(output.transformed_feature_spec()) == {"culmen_z", "species"}


def test_analyze_and_transform_names_a_split_it_is_not_given(tmp_path):
    import apache_beam as beam

    from tests.helpers import in_process_pipeline
    from transforms.transform import AnalyzeAndTransform

    train, _ = _penguin_batches()
    p = in_process_pipeline()
    with pytest.raises(PipelineDefinitionError, match=r"splits \['test'\] are not among \['train'\]"):
        _ = {"train": p | beam.Create([train])} | AnalyzeAndTransform(
            lambda x: dict(x), train.schema, transform_splits=["test"], temp_dir=str(tmp_path)
        )
