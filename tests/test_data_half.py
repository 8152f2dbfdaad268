"""The taxi data half end to end: one read of the raw file, ML Metadata lineage, halting, runners."""

from __future__ import annotations

import os

import pytest
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2
from tensorflow_metadata.proto.v0 import statistics_pb2

from beam_pipeline import Pipeline, artifact_io, launcher
from beam_pipeline.errors import AnomaliesFoundError
from tests.helpers import executions_by_state, in_process_pipeline, store_at
from transforms import _csv_blocks as _example_io
from transforms.example_gen import ExampleGen
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import ImportSchemaGen, SchemaGen
from transforms.statistics_gen import StatisticsGen


def data_half(
    path: str, root, halt: bool = False, schema_file: str | None = None, drift_baseline: str = "train", **gen_args
) -> Pipeline:
    gen = ExampleGen(input_base=path, **gen_args)
    stats = StatisticsGen(examples=gen.outputs.examples)
    schema = ImportSchemaGen(schema_file=schema_file) if schema_file else SchemaGen(statistics=stats.outputs.statistics)
    validator = ExampleValidator(
        statistics=stats.outputs.statistics,
        schema=schema.outputs.schema,
        drift_comparators={"payment_type": 0.1},
        drift_baseline=drift_baseline,
        halt_on_anomalies=halt,
    )
    return Pipeline("taxi", str(root), [gen, stats, schema, validator])


def _read_stats(artifact, split) -> statistics_pb2.DatasetFeatureStatisticsList:
    return artifact_io.read_proto(
        artifact_io.split_file(artifact.uri, split, artifact_io.STATS_FILE), statistics_pb2.DatasetFeatureStatisticsList
    )


def test_graph_reads_raw_data_once_and_passes_batches_in_graph(tmp_path, taxi_small_csv):
    compiled = launcher.compile_run(data_half(taxi_small_csv, tmp_path))
    top = compiled.beam_pipeline.transforms_stack[0]
    # Top-level parts are the components plus the compiler's commit and gate steps ("<id>.<output>...").
    components = [t.full_label for t in top.parts if "." not in t.full_label]
    assert components == ["ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator"]
    # Exactly one source of data in the graph: ExampleGen's read. No component reloads an artifact.
    applied = []

    def walk(node):
        applied.append(node.full_label)
        for part in node.parts:
            walk(part)

    walk(top)
    assert sum(label.endswith("/ReadSplitWrite") for label in applied) == 1
    assert not [label for label in applied if ".Load" in label or "ReadParquet" in label]
    # StatisticsGen consumes the PCollections ExampleGen produced (not a file it would re-read), fused
    # with it: no commit gate in between (FUSE_WITH_PRODUCERS).
    stats_node = next(n for n in top.parts if n.full_label == "StatisticsGen")
    sources = {pc.producer.full_label for pc in stats_node.main_inputs.values()}
    assert sources == {"ExampleGen/ReadSplitWrite/ParDo(_ReadSplitWrite)"}
    # SchemaGen is gated: it starts after StatisticsGen committed, behind the barrier.
    schema_node = next(n for n in top.parts if n.full_label == "SchemaGen")
    assert {pc.producer.full_label for pc in schema_node.main_inputs.values()} == {
        "SchemaGen.statistics.train.AfterCommit",
        "SchemaGen.statistics.eval.AfterCommit",
    }


def test_raw_file_bytes_are_read_once_at_run_time(tmp_path, taxi_small_csv, monkeypatch):
    reads = []
    original = _example_io._read_block

    def counting(path, start, end):
        reads.append((path, start, end))
        return original(path, start, end)

    monkeypatch.setattr(_example_io, "_read_block", counting)
    pipeline = data_half(taxi_small_csv, tmp_path, block_size_bytes=64 << 10)
    ranges = _example_io.byte_ranges(taxi_small_csv, 64 << 10)
    reads.clear()  # compile-time type sampling is not a read of the data
    launcher.run(pipeline)
    data_reads = [r for r in reads if r[2] - r[1] == (64 << 10) or r in ranges]
    assert sorted(data_reads) == sorted(ranges)


@pytest.mark.slow
def test_taxi_data_half_records_executions_artifacts_and_lineage(tmp_path, taxi_csv):
    result = launcher.run(data_half(taxi_csv, tmp_path))
    store = store_at(tmp_path)
    assert executions_by_state(store) == {"COMPLETE": ["ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator"]}
    examples = result.artifact("ExampleGen", "examples")
    assert examples.properties["split_names"] == ["train", "eval"]
    assert sum(examples.properties["row_counts"].values()) == 15002
    assert 0.62 < examples.properties["row_counts"]["train"] / 15002 < 0.71
    assert len(examples.properties["fingerprint"]) == 32
    stats = _read_stats(result.artifact("StatisticsGen", "statistics"), "train")
    assert stats.datasets[0].name == "train"
    assert stats.datasets[0].num_examples == examples.properties["row_counts"]["train"]

    # Types, contexts and events: walk lineage from the anomalies back to the examples and forward again.
    mlmd = store.mlmd
    types = {t.name for t in mlmd.get_artifact_types()}
    assert {"Examples", "ExampleStatistics", "Schema", "ExampleAnomalies"} <= types
    contexts = {c.name for c in mlmd.get_contexts()}
    assert {"taxi", f"taxi.{result.run_id}"} <= contexts
    anomalies_id = result.artifact("ExampleValidator", "anomalies").id
    [producer_event] = [e for e in mlmd.get_events_by_artifact_ids([anomalies_id]) if e.type == mlmd_pb2.Event.OUTPUT]
    inputs = [
        e for e in mlmd.get_events_by_execution_ids([producer_event.execution_id]) if e.type == mlmd_pb2.Event.INPUT
    ]
    assert {e.path.steps[0].key for e in inputs} == {"statistics", "schema"}
    stats_id = result.artifact("StatisticsGen", "statistics").id
    consumers = {e.execution_id for e in mlmd.get_events_by_artifact_ids([stats_id]) if e.type == mlmd_pb2.Event.INPUT}
    consumer_types = {mlmd.get_executions_by_id([i])[0].properties["component_id"].string_value for i in consumers}
    assert consumer_types == {"SchemaGen", "ExampleValidator"}
    [gen_exec] = [e for e in mlmd.get_executions() if e.properties["component_id"].string_value == "ExampleGen"]
    times = gen_exec.custom_properties
    assert times["end_time_ms"].double_value >= times["start_time_ms"].double_value
    assert '"splits": {"eval": 1, "train": 2}' in gen_exec.properties["config"].string_value


@pytest.mark.slow
def test_halt_on_anomalies_fails_with_summary_and_publishes_nothing_downstream(tmp_path, taxi_small_csv):
    # A curated schema that only allows "Cash" as payment type: the data has others.
    schema_file = tmp_path / "schema.pbtxt"
    schema_file.write_text(
        'feature { name: "payment_type" type: BYTES domain: "payment_type" presence { min_count: 1 } }\n'
        'string_domain { name: "payment_type" value: "Cash" }\n'
    )
    pipeline = data_half(taxi_small_csv, tmp_path / "root", halt=True, schema_file=str(schema_file))
    with pytest.raises(AnomaliesFoundError) as info:
        launcher.run(pipeline)
    message = str(info.value)
    assert "ExampleValidator found" in message and "payment_type: Unexpected string values" in message
    assert "train/" in message and "eval/" in message
    store = store_at(tmp_path / "root")
    states = executions_by_state(store)
    # The anomalies artifact is committed and published (so the user can look at it); the run failed.
    assert "ExampleValidator" in states["COMPLETE"]
    anomalies = store.latest_artifacts("ExampleAnomalies", "taxi")
    assert anomalies and anomalies[0].properties["anomaly_count"] >= 2


@pytest.mark.slow
def test_portable_runner_gives_the_same_statistics(tmp_path, taxi_small_csv):
    from runners.options import PRESETS, local_portable_services

    direct = launcher.run(data_half(taxi_small_csv, tmp_path / "direct"), PRESETS["direct"])
    # Local paths: the workers share the driver's disk here (tests/test_distributed.py runs isolated, on S3).
    with local_portable_services(isolate=False) as args:
        portable = launcher.run(data_half(taxi_small_csv, tmp_path / "portable"), args)
    for split in ("train", "eval"):
        a = _read_stats(direct.artifact("StatisticsGen", "statistics"), split).datasets[0]
        b = _read_stats(portable.artifact("StatisticsGen", "statistics"), split).datasets[0]
        assert a.num_examples == b.num_examples
        fa = {f.path.step[0]: f for f in a.features}
        fb = {f.path.step[0]: f for f in b.features}
        assert fa.keys() == fb.keys()
        for name in fa:
            if fa[name].HasField("num_stats"):
                assert fa[name].num_stats.mean == pytest.approx(fb[name].num_stats.mean)
                assert (
                    fa[name].num_stats.common_stats.num_non_missing == fb[name].num_stats.common_stats.num_non_missing
                )
            else:
                assert fa[name].string_stats.unique == fb[name].string_stats.unique
    assert (
        direct.artifact("ExampleGen", "examples").properties["row_counts"]
        == portable.artifact("ExampleGen", "examples").properties["row_counts"]
    )
    assert os.path.exists(os.path.join(portable.artifact("SchemaGen", "schema").uri, "schema.pbtxt"))


def test_statistics_options_slicing(tmp_path, taxi_small_csv):
    gen = ExampleGen(input_base=taxi_small_csv)
    stats = StatisticsGen(examples=gen.outputs.examples, slice_features=["payment_type"], num_top_values=3)
    result = launcher.run(Pipeline("opts", str(tmp_path), [gen, stats]))
    datasets = _read_stats(result.artifact("StatisticsGen", "statistics"), "train").datasets
    names = [d.name for d in datasets]
    assert names[0] == "train" and "payment_type_Cash" in names
    cash = next(d for d in datasets if d.name == "payment_type_Cash")
    assert 0 < cash.num_examples < datasets[0].num_examples
    company = next(f for f in datasets[0].features if f.path.step[0] == "company")
    assert len(company.string_stats.top_values) == 3
    # The slices are of this split only: per value, they add up to the split.
    payment = [d for d in datasets if d.name.startswith("payment_type_")]
    assert sum(d.num_examples for d in payment) == datasets[0].num_examples
    eval_names = [d.name for d in _read_stats(result.artifact("StatisticsGen", "statistics"), "eval").datasets]
    assert eval_names[0] == "eval" and "payment_type_Cash" in eval_names


def test_statistics_sample_rows(tmp_path, taxi_small_csv):
    gen = ExampleGen(input_base=taxi_small_csv)
    stats = StatisticsGen(examples=gen.outputs.examples, sample_rate=0.5)
    result = launcher.run(Pipeline("sample", str(tmp_path), [gen, stats]))
    rows = result.artifact("ExampleGen", "examples").properties["row_counts"]["train"]
    sampled = _read_stats(result.artifact("StatisticsGen", "statistics"), "train").datasets[0].num_examples
    assert 0.4 * rows < sampled < 0.6 * rows  # rows are sampled, not whole blocks


def test_statistics_match_tfdv_generate_statistics_per_split(tmp_path, taxi_small_csv):
    """One TFDV pass keyed by split gives what `tfdv.GenerateStatistics` gives on each split alone."""
    import apache_beam as beam
    import pyarrow.parquet as pq
    import tensorflow_data_validation as tfdv

    gen = ExampleGen(input_base=taxi_small_csv)
    stats = StatisticsGen(examples=gen.outputs.examples, num_top_values=5)
    result = launcher.run(Pipeline("same", str(tmp_path / "root"), [gen, stats]))
    examples = result.artifact("ExampleGen", "examples")
    for split in ("train", "eval"):
        batches = pq.read_table(os.path.join(examples.uri, f"Split-{split}")).to_batches()
        out = str(tmp_path / f"{split}.tfrecord")
        with in_process_pipeline() as p:
            _ = (
                p
                | beam.Create(batches, reshuffle=False)
                | tfdv.GenerateStatistics(tfdv.StatsOptions(num_top_values=5))
                | tfdv.WriteStatisticsToTFRecord(out)
            )
        [expected] = tfdv.load_statistics(out).datasets
        [ours] = _read_stats(result.artifact("StatisticsGen", "statistics"), split).datasets
        assert ours.name == split and ours.num_examples == expected.num_examples > 0
        mine = {f.path.step[0]: f for f in ours.features}
        theirs = {f.path.step[0]: f for f in expected.features}
        assert mine.keys() == theirs.keys()
        for name, f in theirs.items():
            g = mine[name]
            if f.HasField("num_stats"):
                assert g.num_stats.common_stats == f.num_stats.common_stats, name
                for field in ("mean", "std_dev", "min", "max", "num_zeros"):
                    assert getattr(g.num_stats, field) == pytest.approx(getattr(f.num_stats, field)), (name, field)
            else:
                assert g.string_stats.common_stats == f.string_stats.common_stats, name
                assert g.string_stats.unique == f.string_stats.unique, name
                assert g.string_stats.top_values == f.string_stats.top_values, name


def test_default_runner_is_in_process_and_never_tries_prism(tmp_path, taxi_small_csv):
    from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    from runners.options import PRESETS

    default = launcher.compile_run(data_half(taxi_small_csv, tmp_path / "a"), ["--temp_location=/tmp/x"]).beam_pipeline
    preset = launcher.compile_run(data_half(taxi_small_csv, tmp_path / "b"), PRESETS["direct"]).beam_pipeline
    assert type(default.runner) is FnApiRunner and type(preset.runner) is FnApiRunner
    # Its workers get the pipeline options, as DirectRunner hands them over when it picks this runner.
    options = default.runner._provision_info.provision_info.pipeline_options.fields
    assert options["beam:option:temp_location:v1"].string_value == "/tmp/x"
    explicit = launcher.compile_run(data_half(taxi_small_csv, tmp_path / "c"), ["--runner=DirectRunner"])
    assert isinstance(explicit.beam_pipeline.runner, SwitchingDirectRunner)


def test_split_statistics_runs_in_a_bare_beam_pipeline():
    import apache_beam as beam
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.csv as pv
    from apache_beam.testing.util import assert_that

    from tests.conftest import PENGUIN_CSV
    from transforms._arrow_layout import to_list_batch
    from transforms.statistics_gen import SplitStatistics

    table = pv.read_csv(PENGUIN_CSV)
    batches = [to_list_batch(table.slice(i, 100)) for i in range(0, table.num_rows, 100)]

    def check(protos):
        (stats,) = protos
        whole, *slices = stats.datasets
        assert whole.name == "train" and whole.num_examples == table.num_rows
        culmen = next(f for f in whole.features if f.path.step == ["culmen_length_mm"])
        assert np.isclose(culmen.num_stats.mean, pc.mean(table.column("culmen_length_mm")).as_py())
        species = pc.value_counts(table.column("species")).to_pylist()
        assert sorted(d.num_examples for d in slices) == sorted(c["counts"] for c in species)
        assert all(d.name.startswith("species_") for d in slices)

    p = in_process_pipeline()
    stats = p | beam.Create(batches) | SplitStatistics("train", slice_features=["species"])
    assert_that(stats, check)
    p.run().wait_until_finish()


@pytest.mark.parametrize("threshold, drifted", [(0.01, True), (1.0, False)])
def test_validate_statistics_runs_in_a_bare_beam_pipeline(threshold, drifted):
    import apache_beam as beam
    import pyarrow.csv as pv
    import tensorflow_data_validation as tfdv
    from apache_beam.testing.util import assert_that

    from tests.conftest import PENGUIN_CSV
    from transforms._arrow_layout import to_list_batch
    from transforms.example_validator import ValidateStatistics
    from transforms.statistics_gen import SplitStatistics

    # The file is sorted by species: the first 200 rows (train) hold other species than the rest.
    table = pv.read_csv(PENGUIN_CSV)
    p = in_process_pipeline()
    stats = {
        split: p | f"Read[{split}]" >> beam.Create([to_list_batch(part)]) | f"Stats[{split}]" >> SplitStatistics(split)
        for split, part in (("train", table.slice(0, 200)), ("eval", table.slice(200)))
    }
    schema = stats["train"] | beam.Map(tfdv.infer_schema)
    anomalies = stats | ValidateStatistics(schema, drift_comparators={"body_mass_g": threshold})

    def check(split, expect_drift):
        def matcher(protos):
            from tensorflow_metadata.proto.v0 import anomalies_pb2

            (a,) = protos
            reasons = [anomalies_pb2.AnomalyInfo.Type.Name(r.type) for r in a.anomaly_info["body_mass_g"].reason]
            assert ("COMPARATOR_JENSEN_SHANNON_DIVERGENCE_HIGH" in reasons) == expect_drift, (split, a)

        return matcher

    assert_that(anomalies["train"], check("train", False), label="CheckTrain")
    assert_that(anomalies["eval"], check("eval", drifted), label="CheckEval")
    p.run().wait_until_finish()


def test_drift_against_the_previous_run_compares_with_that_runs_statistics(tmp_path, taxi_small_csv):
    import csv

    from tensorflow_metadata.proto.v0 import anomalies_pb2

    def run(path):
        result = launcher.run(data_half(path, tmp_path / "root", drift_baseline="previous_run"))
        anomalies = result.artifact("ExampleValidator", "anomalies")
        out = {}
        for split in anomalies.split_names:
            proto = artifact_io.read_proto(
                artifact_io.split_file(anomalies.uri, split, artifact_io.ANOMALIES_FILE), anomalies_pb2.Anomalies
            )
            info = proto.anomaly_info.get("payment_type")
            out[split] = [anomalies_pb2.AnomalyInfo.Type.Name(r.type) for r in info.reason] if info else []
        return out

    # The next day every fare is paid in cash: far from the previous run's mix of payment types.
    cash = tmp_path / "cash.csv"
    with open(taxi_small_csv, newline="") as src, open(cash, "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, reader.fieldnames)
        writer.writeheader()
        writer.writerows({**row, "payment_type": "Cash"} for row in reader)
    first = run(taxi_small_csv)
    assert all("COMPARATOR_L_INFTY_HIGH" not in reasons for reasons in first.values())  # no previous run yet
    second = run(str(cash))
    assert set(second) == {"train", "eval"}
    assert all("COMPARATOR_L_INFTY_HIGH" in reasons for reasons in second.values()), second
