"""Queries, lineage, TensorBoard and diff over ML Metadata, as a Python API and as CLI subcommands."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import types
import urllib.request

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import pytest
from click.testing import CliRunner

from beam_pipeline import lineage, queries
from beam_pipeline.cli import main
from beam_pipeline.errors import MetadataError
from tests import _fixtures_metadata as fm


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# -- without a store ---------------------------------------------------------------------------------
def test_flatten_makes_one_column_per_setting():
    config = {"train_steps": 10, "splits": {"train": 2, "eval": 1}, "hyperparameters": {}, "input_base": ["a"]}
    assert queries.flatten(config) == {
        "train_steps": 10,
        "splits.train": 2,
        "splits.eval": 1,
        "hyperparameters": {},
        "input_base": ["a"],
    }


def _eval_result(slices):
    return types.SimpleNamespace(slicing_metrics=slices)


def _metrics(**values):
    return {"": {"": {k: {"doubleValue": v} for k, v in values.items()}}}


def test_metrics_frame_orders_slices_by_value_and_keeps_overall_first():
    result = _eval_result(
        [
            ((("hour", 10),), _metrics(auc=0.5, example_count=3)),
            ((), _metrics(auc=0.7, example_count=6)),
            ((("hour", 2),), _metrics(auc=0.9, example_count=3)),
            ((("company", "x"),), _metrics(auc=0.1, example_count=6)),
        ]
    )
    by_hour = queries.metrics_frame(result, "hour")
    assert list(by_hour["slice_value"]) == [2, 10]
    assert list(by_hour["auc"]) == [0.9, 0.5]
    everything = queries.metrics_frame(result)
    assert list(everything["slice"]) == ["Overall", "company=x", "hour=2", "hour=10"]
    with pytest.raises(MetadataError, match=r"no slices by 'day'; sliced columns are \['company', 'hour'\]"):
        queries.metrics_frame(result, "day")


def test_statistics_drift_is_tfdvs_own_measurement():
    import pandas as pd
    import tensorflow_data_validation as tfdv

    def stats(cash: int, fare_shift: float):
        return tfdv.generate_statistics_from_dataframe(
            pd.DataFrame(
                {"payment": ["cash"] * cash + ["card"] * (100 - cash), "fare": np.linspace(0, 10, 100) + fare_shift}
            )
        )

    day_one, day_two = stats(50, 0.0), stats(80, 5.0)
    moved = queries.statistics_diff(day_one, day_two).set_index("feature")
    # The largest change in one value's share (50% -> 80% cash), as ExampleValidator's comparator says.
    assert moved.loc["payment", "drift_measure"] == "L-infinity"
    assert moved.loc["payment", "drift"] == pytest.approx(0.3)
    assert moved.loc["fare", "drift_measure"] == "Jensen-Shannon" and 0.1 < moved.loc["fare", "drift"] <= 1
    assert queries.statistics_diff(day_one, day_one)["drift"].max() == pytest.approx(0.0)


def test_store_must_be_named_and_must_exist(tmp_path):
    with pytest.raises(MetadataError, match="--metadata-uri"):
        queries.store_uri(None, None)
    missing = tmp_path / "nowhere" / "metadata.sqlite"
    with pytest.raises(MetadataError, match="no ML Metadata store at"):
        queries.open_store(str(missing))
    assert not missing.parent.exists()
    result = CliRunner().invoke(main, ["runs", "--pipeline-root", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "no ML Metadata store at" in result.output


# -- on recorded runs --------------------------------------------------------------------------------
@pytest.mark.slow
def test_runs_lists_each_run_with_its_state(model_store):
    table = queries.runs(model_store["store"], "chicago_taxi")
    assert list(table["run_id"]) == sorted(model_store["runs"], reverse=True)
    by_run = table.set_index("run_id")
    a, b, cached = model_store["runs"]
    assert by_run.loc[a, "state"] == "COMPLETE" and by_run.loc[a, "components"] == 8
    assert by_run.loc[b, "complete"] == 8  # other rows and code: nothing reused from run A
    assert by_run.loc[cached, "state"] == "CACHED" and by_run.loc[cached, "cached"] == 4
    assert (table["duration_s"] >= 0).all()


@pytest.mark.slow
def test_executions_of_a_type_flatten_configuration_and_name_artifacts(model_store):
    table = queries.executions(model_store["store"], "Trainer").set_index("id")
    a, b = model_store["a"], model_store["b"]
    steps = list(table.loc[[a["trainer_execution"], b["trainer_execution"]], "train_steps"])
    assert steps == list(model_store["train_steps"]) and steps[0] != steps[1]
    assert not table["warm_start"].any()
    modules = list(table.loc[[a["trainer_execution"], b["trainer_execution"]], "module_file"])
    assert modules == model_store["module_paths"]
    row = table.loc[a["trainer_execution"]]
    assert row["state"] == "COMPLETE"
    assert row["inputs"] == {
        "examples": [a["transformed_examples"]],
        "transform_graph": [a["transform_graph"]],
        "schema": [a["schema"]],
    }
    assert row["outputs"] == {"model": a["model"], "model_run": a["model_run"]}
    gens = queries.executions(model_store["store"], "ExampleGen")
    assert sorted(gens["state"]) == ["CACHED", "COMPLETE", "COMPLETE"]
    assert set(gens["splits.train"]) == {2}
    with pytest.raises(MetadataError, match=r"no executions of type 'Trainerr'.*'Trainer'"):
        queries.executions(model_store["store"], "Trainerr")


@pytest.mark.slow
def test_runs_and_executions_cli_print_table_csv_and_json(model_store):
    root = model_store["root"]
    records = json.loads(_cli("runs", "--pipeline-root", root, "--format", "json"))
    assert {r["run_id"] for r in records} == set(model_store["runs"])
    csv_text = _cli("executions", "Trainer", "--pipeline-root", root, "--format", "csv")
    header = csv_text.splitlines()[0].split(",")
    assert {"id", "state", "duration_s", "train_steps", "warm_start", "inputs", "outputs"} <= set(header)
    assert len(csv_text.strip().splitlines()) == 3
    table = CliRunner(env={"BEAM_PIPELINE_METADATA_URI": model_store["store"]}).invoke(main, ["executions", "Trainer"])
    assert table.exit_code == 0 and "train_steps" in table.output and "COMPLETE" in table.output


@pytest.mark.slow
def test_lineage_counts_hops_and_follows_the_direction(model_store):
    a, b = model_store["a"], model_store["b"]
    up = lineage.lineage(model_store["store"], a["model"], num_hops=2, direction="up")
    nodes = up.nodes_frame().set_index("node")
    assert set(nodes.index) == {
        f"artifact:{a['model']}",
        f"execution:{a['trainer_execution']}",
        f"artifact:{a['transformed_examples']}",
        f"artifact:{a['transform_graph']}",
        f"artifact:{a['schema']}",
    }
    assert nodes.loc[f"execution:{a['trainer_execution']}", "state"] == "COMPLETE"
    assert nodes.loc[f"artifact:{a['transformed_examples']}", "hops"] == 2
    down = lineage.lineage(model_store["store"], a["model"], num_hops=2, direction="down")
    assert {n["type"] for n in down.nodes if n["kind"] == "artifact"} == {
        "Model",
        "ModelEvaluation",
        "ModelBlessing",
        "PushedModel",
    }
    both = lineage.lineage(model_store["store"], a["model"], num_hops=2, direction="both")
    assert {n["node"] for n in both.nodes} == {n["node"] for n in up.nodes} | {n["node"] for n in down.nodes}
    edges = both.edges_frame()
    assert {"source": f"artifact:{a['transformed_examples']}", "target": f"execution:{a['trainer_execution']}",
            "event": "INPUT", "name": "examples"} in edges.to_dict("records")  # fmt: skip
    further = lineage.lineage(model_store["store"], a["model"], num_hops=5, direction="up")
    assert "StatisticsGen" not in set(up.nodes_frame()["type"])
    assert {"ExampleGen", "SchemaGen", "StatisticsGen", "Transform"} <= set(further.nodes_frame()["type"])
    assert f"artifact:{b['model']}" not in {n["node"] for n in further.nodes}  # B never fed A
    with pytest.raises(MetadataError, match="direction 'sideways'"):
        lineage.lineage(model_store["store"], a["model"], 2, "sideways")


def _one_hop_executions(model_store) -> set[int]:
    """Run A's Trainer, Evaluator and Pusher, and run B's Evaluator, which read model A as its baseline."""
    a, b = model_store["a"], model_store["b"]
    evaluator_b = queries.executions(model_store["store"], "Evaluator").set_index("id").loc[b["evaluator_execution"]]
    assert evaluator_b["inputs"] == {"examples": [b["examples"]], "model": [b["model"]], "baseline_model": [a["model"]]}
    return {a["trainer_execution"], a["evaluator_execution"], a["pusher_execution"], b["evaluator_execution"]}


@pytest.mark.slow
def test_lineage_renders_png_and_svg_without_graphviz(model_store, tmp_path):
    model = str(model_store["a"]["model"])
    png = _cli("lineage", model, "--hops", "3", "--direction", "both", "--out", str(tmp_path / "g.png"),
               "--pipeline-root", model_store["root"]).strip()  # fmt: skip
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    svg = _cli("lineage", model, "--out", str(tmp_path / "g.svg"), "--pipeline-root", model_store["root"]).strip()
    text = open(svg).read()
    assert "<svg" in text and "Trainer" in text and f"Model #{model}" in text
    as_json = json.loads(
        _cli("lineage", model, "--hops", "1", "--format", "json", "--pipeline-root", model_store["root"])
    )
    assert as_json["direction"] == "both"
    executions = {n["id"] for n in as_json["nodes"] if n["kind"] == "execution"}
    assert executions == _one_hop_executions(model_store)
    assert [n["id"] for n in as_json["nodes"] if n["kind"] == "artifact"] == [int(model)]


@pytest.mark.slow
def test_training_data_walks_from_model_to_the_statistics_of_its_examples(model_store):
    a = model_store["a"]
    data = queries.training_data(model_store["store"], a["model"])
    assert data.examples.id == a["examples"]  # the raw data, reached through Transform
    assert data.statistics.id == a["statistics"]
    assert data.schema.id == a["schema"]
    assert set(data.stats) == {"train", "eval"}
    frame = queries.statistics_frame(data.stats["train"]).set_index("feature")
    assert frame.loc["fare", "count"] == json.loads(json.dumps(data.examples.properties["row_counts"]))["train"]
    assert frame.loc["payment_type", "unique"] >= 2
    with pytest.raises(MetadataError, match="is of type Examples, not Model"):
        queries.training_data(model_store["store"], a["examples"])


@pytest.mark.slow
def test_model_metrics_slice_by_a_column(model_store):
    frame = queries.model_metrics(model_store["store"], model_store["a"]["model"], "trip_start_hour")
    assert {"slice", "slice_value", "example_count", "auc", "binary_accuracy"} <= set(frame.columns)
    values = list(frame["slice_value"])
    assert values == sorted(values) and all(isinstance(v, int) for v in values) and len(values) > 10
    overall = queries.model_metrics(model_store["store"], model_store["a"]["model"])
    assert overall.iloc[0]["slice"] == "Overall"
    assert frame["example_count"].sum() == overall.iloc[0]["example_count"]
    printed = _cli("model-metrics", str(model_store["a"]["model"]), "--slice", "trip_start_hour", "--format", "csv",
                   "--pipeline-root", model_store["root"])  # fmt: skip
    assert printed.splitlines()[0].startswith("slice,slice_value")
    assert queries.model_outcome(model_store["store"], model_store["a"]["model"])["blessed"] is True


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


@pytest.mark.slow
def test_tensorboard_serves_one_model_then_two_side_by_side(model_store):
    a, b = model_store["a"]["model"], model_store["b"]["model"]
    server = queries.start_tensorboard(model_store["store"], [a])
    try:
        assert server.url.startswith("http://127.0.0.1:")
        status, body = _get(server.url)
        assert status == 200 and b"<html" in body.lower()
    finally:
        server.stop()
    with pytest.raises(OSError):  # refused (URLError) or, if caught mid-close, reset: no longer served
        _get(server.url)
    server = queries.start_tensorboard(model_store["store"], [a, b])
    try:
        status, body = _get(server.url + "data/runs")
        runs = json.loads(body)
        assert status == 200
        assert any(r.startswith(f"model_{a}") for r in runs) and any(r.startswith(f"model_{b}") for r in runs)
    finally:
        server.stop()


@pytest.mark.slow
def test_diff_shows_data_code_config_statistics_and_metrics(model_store):
    a, b = model_store["a"]["model"], model_store["b"]["model"]
    result = queries.diff(model_store["store"], a, b)
    data = result.data.set_index("examples").loc["ExampleGen"]
    assert not data["same"] and data["lhs_fingerprint"] != data["rhs_fingerprint"]
    assert json.loads(data["lhs_rows"]) != json.loads(data["rhs_rows"])
    config = {(r.component, r.key): (r.lhs, r.rhs) for r in result.config.itertuples()}
    steps = model_store["train_steps"]
    assert config[("Trainer", "train_steps")] == (str(steps[0]), str(steps[1]))
    assert ("ExampleGen", "input_base") in config
    code = result.code["Trainer.module_file"]
    assert f"-{fm.MODULE_A_LINE}" in code and f"+{fm.MODULE_B_LINE}" in code
    fare = result.statistics[(result.statistics["split"] == "train") & (result.statistics["feature"] == "fare")].iloc[0]
    assert fare["lhs_mean"] != fare["rhs_mean"] and fare["mean_change_pct"] == pytest.approx(
        100 * (fare["rhs_mean"] - fare["lhs_mean"]) / abs(fare["lhs_mean"])
    )
    payment = result.statistics[result.statistics["feature"] == "payment_type"].iloc[0]
    assert payment["drift_measure"] == "L-infinity" and 0 <= payment["drift"] <= 1
    assert set(result.metrics["metric"]) >= {"auc", "binary_accuracy", "example_count"}
    changes = result.metrics.set_index("metric")["change"]
    assert changes[["auc", "binary_accuracy", "example_count"]].notna().all()  # both models were evaluated
    assert list(result.schema.columns) == ["feature", "change", "lhs", "rhs"]
    as_json = json.loads(_cli("diff", str(a), str(b), "--format", "json", "--pipeline-root", model_store["root"]))
    assert as_json["lhs"] == a and "Trainer.module_file" in as_json["code"]
    text = _cli("diff", str(a), str(b), "--pipeline-root", model_store["root"])
    assert "train_steps" in text and f"+{fm.MODULE_B_LINE}" in text
    same = queries.diff(model_store["store"], a, a)
    assert same.config.empty and not same.code and same.statistics.empty and bool(same.data["same"].all())


@pytest.mark.slow
def test_diff_compares_the_module_code_each_model_was_built_from(model_store):
    """Both module files are rewritten after the runs: the diff must still show what each model was built from."""
    a, b = model_store["a"]["model"], model_store["b"]["model"]
    originals = {}
    for path in model_store["module_paths"]:
        with open(path) as f:
            originals[path] = f.read()
    try:
        for path in originals:
            with open(path, "w") as f:
                f.write("# rewritten after the runs\n")
        code = queries.diff(model_store["store"], a, b).code.get("Trainer.module_file", "")
    finally:
        for path, text in originals.items():
            with open(path, "w") as f:
                f.write(text)
    assert f"-{fm.MODULE_A_LINE}" in code and f"+{fm.MODULE_B_LINE}" in code
    assert "as staged at launch" in code and "rewritten after the runs" not in code


def _read_lines_into(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # the command closed its output: it died or is exiting


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job


@pytest.mark.slow
@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_tensorboard_cli_prints_the_url_and_stops_on_a_signal_even_started_with_sigint_ignored(
    model_store, tmp_path, stop_with
):
    a, b = model_store["a"]["model"], model_store["b"]["model"]
    command = [sys.executable, "-m", "beam_pipeline", "tensorboard", str(a), str(b),
               "--pipeline-root", model_store["root"]]  # fmt: skip
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   preexec_fn=_ignore_sigint, start_new_session=True)  # fmt: skip
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines_into, args=(process.stdout, lines), daemon=True).start()
        printed = []
        while not printed or not printed[-1].startswith("TensorBoard at "):
            line = lines.get(timeout=600)  # startup imports TensorFlow: slow on a busy machine
            assert line is not None, "".join(printed) + stderr_path.read_text()[-3000:]
            printed.append(line)
        assert printed[-1].startswith("TensorBoard at http://127.0.0.1:")
        assert f"model_{a}:" in printed[0] and f"model_{b}:" in printed[1]
        url = printed[-1].split()[2]
        status, body = _get(url + "data/runs")
        assert status == 200 and len(json.loads(body)) >= 2
        process.send_signal(stop_with)
        assert process.wait(timeout=120) == 0, stderr_path.read_text()[-3000:]
        rest = []
        while (line := lines.get(timeout=60)) is not None:
            rest.append(line)
        assert "TensorBoard stopped\n" in rest
        with pytest.raises(OSError):
            _get(url)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # nothing of this test outlives it, passed or failed
        except ProcessLookupError:
            pass  # the group is already gone
        process.wait(timeout=60)


def test_the_lineage_walker_follows_originals_and_stops_at_other_models(model_store):
    from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

    from beam_pipeline._lineage_walk import MAX_HOPS, walk
    from beam_pipeline.artifacts import MODEL

    store = queries.open_store(model_store["store"])
    a, b = model_store["a"], model_store["b"]
    # Run C reused run A's examples from the cache: both ExampleGen executions output them.
    producers = walk(store, a["examples"], 1, upward=True).execution_hops
    states = {e.id: e.last_known_state for e in store.mlmd.get_executions_by_id(list(producers))}
    assert sorted(states.values()) == sorted([mlmd_pb2.Execution.COMPLETE, mlmd_pb2.Execution.CACHED])
    original = walk(store, a["examples"], 1, upward=True, originals_only=True).execution_hops
    assert [states[e] for e in original] == [mlmd_pb2.Execution.COMPLETE]
    # Run B's Evaluator read run A's model as its baseline: reached, but A's own lineage is not walked.
    everything = walk(store, b["evaluation"], MAX_HOPS, upward=True)
    stopped = walk(store, b["evaluation"], MAX_HOPS, upward=True, stop_at_types=[MODEL.name])
    assert a["model"] in everything.artifact_hops and a["model"] in stopped.artifact_hops
    assert a["examples"] in everything.artifact_hops and a["examples"] not in stopped.artifact_hops
    _, artifacts = queries.upstream(store, b["evaluation"])
    assert a["model"] in [x.id for x in artifacts] and a["examples"] not in [x.id for x in artifacts]
    assert [x.id for x in artifacts] == sorted(
        (x.id for x in artifacts), key=lambda i: (stopped.artifact_hops[i], i)
    )  # nearest first
