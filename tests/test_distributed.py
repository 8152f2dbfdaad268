"""The whole taxi pipeline distributed: SDK workers that share no disk with the driver, root on S3.

The reference is the same pipeline on the default runner with a local root. On `portable-local`
(Beam's job service and an isolated SDK worker pool in other processes, over the Fn API) with the
data, the pipeline root and the serving dir on the loopback S3 server, every artifact must match:
row counts, statistics, schema and vocabularies exactly; the trained model's metrics within a stated
tolerance (training reads the same rows, but the runner may shard them differently). A rerun is all
CACHED. An SDK worker killed with SIGKILL mid-job ends the run with nothing half-published, and the
rerun completes from what had committed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from beam_pipeline import launcher, remote_fs
from beam_pipeline.metadata import MetadataStore
from tests.conftest import ROOT
from tests.helpers import executions_by_state
from tests.test_model_caching import taxi_pipeline
from tests.test_object_store_root import COMPONENTS

TRAIN_STEPS = 60
# AUC of two seeded 60-step models fed the same rows in a possibly different order.
METRIC_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory, taxi_small_csv, s3_server):
    """The reference run (default runner, local) and the distributed run (portable-local, S3)."""
    from runners.options import runner_args

    local = tmp_path_factory.mktemp("reference")
    # The taxi pipeline with thresholds a briefly trained model passes, so both runs push.
    reference = launcher.run(taxi_pipeline(local / "root", taxi_small_csv, local / "serving", train_steps=TRAIN_STEPS))
    bucket = s3_server.new_bucket()
    data = f"{bucket}/data/data.csv"
    s3_server.client().upload_file(taxi_small_csv, bucket[5:], "data/data.csv")
    distributed_pipeline = taxi_pipeline(f"{bucket}/root", data, f"{bucket}/serving", train_steps=TRAIN_STEPS)
    metadata = str(tmp_path_factory.mktemp("metadata") / "metadata.sqlite")
    with runner_args("portable-local") as args:
        distributed = launcher.run(distributed_pipeline, args, metadata_uri=metadata)
        rerun = launcher.run(distributed_pipeline, args, metadata_uri=metadata)
    return {"reference": reference, "distributed": distributed, "rerun": rerun, "bucket": bucket}


def _states(result) -> dict[str, str]:
    return {cid: c.state for cid, c in result.components.items()}


@pytest.mark.slow
def test_every_component_completes_then_a_rerun_is_all_cached(runs):
    assert _states(runs["reference"]) == dict.fromkeys(COMPONENTS, "COMPLETE")
    assert _states(runs["distributed"]) == dict.fromkeys(COMPONENTS, "COMPLETE")
    assert _states(runs["rerun"]) == dict.fromkeys(COMPONENTS, "CACHED")
    for cid, component in runs["distributed"].components.items():
        for name, artifact in component.artifacts.items():
            assert artifact.uri.startswith(runs["bucket"] + "/"), (cid, name, artifact.uri)


@pytest.mark.slow
def test_same_rows_statistics_and_schema_as_the_default_runner(runs):
    from beam_pipeline import queries

    ref, dist = runs["reference"], runs["distributed"]
    assert (
        ref.artifact("ExampleGen", "examples").properties["row_counts"]
        == dist.artifact("ExampleGen", "examples").properties["row_counts"]
    )
    remote_fs.enable_for([runs["bucket"]])
    ref_stats = queries.read_statistics(ref.artifact("StatisticsGen", "statistics"))
    dist_stats = queries.read_statistics(dist.artifact("StatisticsGen", "statistics"))
    assert ref_stats.keys() == dist_stats.keys()
    for split in ref_stats:
        a = queries.statistics_frame(ref_stats[split]).set_index("feature").sort_index()
        b = queries.statistics_frame(dist_stats[split]).set_index("feature").sort_index()
        assert list(a.index) == list(b.index)
        numeric = a.select_dtypes("number").columns
        assert (a[numeric] - b[numeric]).abs().max().max() < 1e-6, split
        assert a.drop(columns=numeric).equals(b.drop(columns=numeric)), split
    assert _sorted_schema(queries.read_schema(ref.artifact("SchemaGen", "schema"))) == _sorted_schema(
        queries.read_schema(dist.artifact("SchemaGen", "schema"))
    )


def _sorted_schema(schema):
    """The schema with features and string domains in name order (the order statistics listed them in)."""
    out = type(schema)()
    out.CopyFrom(schema)
    for field in ("feature", "string_domain"):
        items = sorted(getattr(out, field), key=lambda x: x.name)
        copies = [type(x)() for x in items]
        for copy, item in zip(copies, items, strict=True):
            copy.CopyFrom(item)
        del getattr(out, field)[:]
        getattr(out, field).extend(copies)
    return out


@pytest.mark.slow
def test_same_vocabularies_as_the_default_runner(runs):
    import tensorflow as tf

    def vocabularies(result) -> dict[str, bytes]:
        assets = result.artifact("Transform", "transform_graph").uri + "/transform_fn/assets"
        return {name: tf.io.gfile.GFile(f"{assets}/{name}", "rb").read() for name in tf.io.gfile.listdir(assets)}

    remote_fs.enable_for([runs["bucket"]])
    ref = vocabularies(runs["reference"])
    assert ref, "the taxi preprocessing_fn computes vocabularies"
    assert vocabularies(runs["distributed"]) == ref


@pytest.mark.slow
def test_model_metrics_agree_within_tolerance(runs):
    from beam_pipeline import queries

    remote_fs.enable_for([runs["bucket"]])

    def overall(result) -> dict[str, float]:
        frame = queries.metrics_frame(queries.load_eval_result(result.artifact("Evaluator", "evaluation").uri))
        row = frame[frame["slice"] == queries.OVERALL].iloc[0]
        return {name: float(row[name]) for name in ("auc", "binary_accuracy")}

    ref, dist = overall(runs["reference"]), overall(runs["distributed"])
    for name in ref:
        assert abs(ref[name] - dist[name]) <= METRIC_TOLERANCE, (name, ref[name], dist[name])


@pytest.mark.slow
def test_the_model_pushed_to_s3_is_served_from_s3(runs, taxi_small_csv, tmp_path):
    """`beam-pipeline serve --model_base_path s3://...` answers :predict with the pushed model's own scores."""
    import httpx
    import numpy as np
    import tensorflow as tf

    from tests.serving.serve_process import serve_process, wait_for
    from tests.serving.test_taxi_end_to_end import instances, missing, raw_columns, scores, take

    remote_fs.enable_for([runs["bucket"]])
    pushed = runs["distributed"].artifact("Pusher", "pushed_model").properties
    assert pushed["pushed"] == 1 and pushed["pushed_destination"] == f"{runs['bucket']}/serving/1", pushed
    model = tf.saved_model.load(f"{runs['bucket']}/serving/1")
    columns = raw_columns(taxi_small_csv, model, 64)
    floats = [name for name, array in columns.items() if array.dtype == np.float32]
    rows = take(columns, ~np.any([missing(columns[name]) for name in floats], axis=0))  # JSON has no NaN
    assert len(rows["fare"]) >= 16
    expected = scores(model, rows).reshape(-1)
    with serve_process(f"{runs['bucket']}/serving", tmp_path / "serve.log") as (proc, url):
        wait_for(
            lambda: httpx.get(url).json()["model_version_status"][0]["state"] == "AVAILABLE",
            "version 1 is AVAILABLE",
            proc,
        )
        answer = httpx.post(f"{url}:predict", json={"instances": instances(rows)}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert np.allclose(np.array(answer.json()["predictions"]).reshape(-1), expected, atol=1e-6)


def _sdk_workers(tag: str) -> list[int]:
    """Pids of the SDK worker processes whose environment carries `tag` (this run's, not another suite's)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                tagged = f"BP_KILL_TEST={tag}".encode() in f.read().split(b"\0")
        except OSError:
            continue
        if b"sdk_worker_main" in cmdline and tagged:
            pids.append(int(entry))
    return pids


def _wait_for(condition, what: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _running(metadata: str, component: str) -> bool:
    if not os.path.exists(metadata):
        return False
    return component in executions_by_state(MetadataStore(metadata)).get("RUNNING", [])


@pytest.mark.slow
def test_an_sdk_worker_killed_mid_job_publishes_nothing_half_written(tmp_path, taxi_small_csv, s3_server):
    bucket = s3_server.new_bucket()
    s3_server.client().upload_file(taxi_small_csv, bucket[5:], "data/data.csv")
    metadata = str(tmp_path / "metadata.sqlite")
    tag = uuid.uuid4().hex
    env = dict(
        os.environ,
        BP_KILL_TEST=tag,
        TAXI_DATA=f"{bucket}/data/data.csv",
        TAXI_TRAIN_STEPS="400",
        SERVING_MODEL_DIR=f"{bucket}/serving",
    )
    command = [
        sys.executable,
        "-m",
        "beam_pipeline",
        "run",
        os.path.join(ROOT, "examples", "chicago_taxi", "pipeline.py"),
        "--runner",
        "portable-local",
        "--pipeline-root",
        f"{bucket}/root",
        "--metadata-uri",
        metadata,
    ]
    run = subprocess.Popen(command, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _running(metadata, "Trainer"), "the Trainer to be RUNNING")
        workers = _wait_for(lambda: _sdk_workers(tag), "an SDK worker process")
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        output, _ = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    text = output.decode(errors="replace")
    store = MetadataStore(metadata)
    states = executions_by_state(store)
    assert "RUNNING" not in states, text[-3000:]
    if run.returncode == 0:  # the runner recovered: then everything must have completed
        assert sorted(states.get("COMPLETE", [])) == sorted(COMPONENTS), text[-3000:]
    else:
        assert "Pusher" not in states.get("COMPLETE", []), text[-3000:]
        assert states.get("FAILED") or states.get("CANCELED"), text[-3000:]
    # Nothing half-published: every artifact recorded in ML Metadata is intact on the store.
    from beam_pipeline import artifact_io

    remote_fs.enable_for([bucket])
    for artifact in store.mlmd.get_artifacts():
        if artifact.state == artifact.LIVE:
            assert artifact_io.is_intact(artifact.uri), artifact.uri

    committed = {
        e.properties["component_id"].string_value for e in store.mlmd.get_executions() if _state(e) == "COMPLETE"
    }
    last_id = max(e.id for e in store.mlmd.get_executions())
    rerun = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    second = {
        e.properties["component_id"].string_value: _state(e) for e in store.mlmd.get_executions() if e.id > last_id
    }
    assert second == {c: "CACHED" if c in committed else "COMPLETE" for c in COMPONENTS}


def _state(execution) -> str:
    from ml_metadata.proto import metadata_store_pb2

    return metadata_store_pb2.Execution.State.Name(execution.last_known_state)
