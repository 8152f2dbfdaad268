"""Trainer(num_workers=2) on portable-local: two Beam elements on two isolated SDK workers form one cluster.

The SDK workers share no disk with the driver or each other, so the data, the pipeline root, the
rendezvous and the task records are all on the loopback S3 server. The reference is single-worker
training of the same transformed data with the same steps and global batch.
"""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest

from beam_pipeline import artifact_io, launcher, remote_fs
from beam_pipeline.dsl import Pipeline
from beam_pipeline.errors import TrainingClusterError, UserModuleError
from beam_pipeline.metadata import MetadataStore
from tests._multi_worker import read_records, write_recording_module
from tests.helpers import executions_by_state
from tests.test_trainer import served_auc, taxi_trainer_components
from transforms.trainer import SERVING_DIR

STEPS = 200
BATCH = 128
# Eval AUC of the 2-worker model against the single-worker one. With one file per split the workers
# shard by element, so each step's two halves make up the single worker's batch (measured: equal to
# 7 digits, 0.9519); the tolerance is the issue's, for sharding by file, where the order differs.
AUC_TOLERANCE = 0.02


def _pipeline(root: str, data: str, record_dir: str, module: str, **trainer) -> Pipeline:
    params = {"strategy": "multi_worker_mirrored", "num_workers": 2, **trainer}
    custom = {"record_dir": record_dir, **params.pop("custom", {})}
    components = taxi_trainer_components(
        data,
        module_file=module,
        train_steps=STEPS,
        hyperparameters={"batch_size": BATCH},
        custom_config=custom,
        **params,
    )
    return Pipeline("taxi", root, components)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, taxi_csv, s3_server):
    """The S3 bucket with the taxi sample, a metadata store and the recording module; runs share the root."""
    from runners.options import runner_args

    bucket = s3_server.new_bucket()
    s3_server.client().upload_file(taxi_csv, bucket[5:], "data/data.csv")
    tmp = tmp_path_factory.mktemp("multi_worker_portable")
    remote_fs.enable_for([bucket])
    setup = {
        "bucket": bucket,
        "root": f"{bucket}/root",
        "data": f"{bucket}/data/data.csv",
        "metadata": str(tmp / "metadata.sqlite"),
        "module": write_recording_module(str(tmp)),
    }
    with runner_args("portable-local") as args:
        setup["args"] = args
        yield setup


def _run(cluster, name: str, **trainer):
    records = f"{cluster['bucket']}/records/{name}"
    pipeline = _pipeline(cluster["root"], cluster["data"], records, cluster["module"], **trainer)
    return launcher.run(pipeline, cluster["args"], metadata_uri=cluster["metadata"])


@pytest.fixture(scope="module")
def runs(cluster):
    """Single-worker reference, a 2-worker run whose task 1 raises, then the 2-worker run."""
    out = {"reference": _run(cluster, "reference", strategy="default", num_workers=1)}
    # Task 1's own error, or task 0's report of it: whichever of the two the runner reports first.
    with pytest.raises((UserModuleError, TrainingClusterError)) as failed:
        _run(cluster, "failed", custom={"fail_task": 1})
    out["failure"] = failed.value
    out["failed_executions"] = executions_by_state(MetadataStore(cluster["metadata"])).get("FAILED", [])
    out["two"] = _run(cluster, "two")
    return out


@pytest.mark.slow
def test_two_sdk_workers_each_train_one_task_of_the_cluster(runs, cluster):
    assert runs["two"].components["Trainer"].state == "COMPLETE"
    records = read_records(f"{cluster['bucket']}/records/two")
    assert sorted(records) == [0, 1]
    for index, record in records.items():
        assert (record["num_workers"], record["replicas"], record["is_chief"]) == (2, 2, index == 0)
        assert record["local_batch"] == BATCH // 2, "each worker gets its half of the global batch"
        assert record["steps"] == STEPS, "each worker ran every step"
        assert record["tf_config"]["task"]["index"] == index
    assert records[0]["tf_config"]["cluster"] == records[1]["tf_config"]["cluster"]
    assert records[0]["pid"] != records[1]["pid"]
    run = runs["two"].artifact("Trainer", "model_run").properties
    assert (run["num_workers"], run["num_replicas"]) == (2, 2)
    # Beam ran the two tasks in different SDK worker processes, each starting its own training process.
    tasks = json.loads(run["tasks"])
    assert [t["task_index"] for t in tasks] == [0, 1]
    assert tasks[0]["parent_pid"] != tasks[1]["parent_pid"]
    assert {t["pid"] for t in tasks} == {r["pid"] for r in records.values()}


@pytest.mark.slow
def test_two_workers_reach_the_auc_of_one_with_the_same_steps_and_global_batch(runs):
    from tests.test_trainer import split_rows

    eval_rows = [split_rows(runs["reference"], "eval")]

    def auc(result) -> float:
        return served_auc(artifact_io.join(result.artifact("Trainer", "model").uri, SERVING_DIR), eval_rows)

    single, two = auc(runs["reference"]), auc(runs["two"])
    assert single > 0.9, single
    assert abs(single - two) <= AUC_TOLERANCE, (single, two)


@pytest.mark.slow
def test_a_task_that_raises_fails_the_trainer_with_nothing_published(runs, cluster):
    assert re.search(r"run_fn in .* raised ValueError: task 1 fails on purpose", str(runs["failure"]))
    assert "Trainer" in runs["failed_executions"]
    assert runs["two"].components["Trainer"].state == "COMPLETE", "a rerun after the failure succeeds"
    import tensorflow as tf

    # Nothing of the failed run's Trainer is left, and its scratch (the rendezvous) is gone too.
    assert not tf.io.gfile.glob(f"{cluster['root']}/_scratch/*")


@pytest.mark.slow
def test_the_rendezvous_times_out_when_the_runner_runs_one_bundle_at_a_time(cluster):
    from runners.options import runner_args

    with runner_args("portable-local", ["--sdk_worker_parallelism=1"]) as args:
        records = f"{cluster['bucket']}/records/alone"
        pipeline = _pipeline(cluster["root"], cluster["data"], records, cluster["module"], rendezvous_timeout_s=5)
        message = r"only 1 of 2 training workers started within 5 s: the runner must run 2 bundles at once"
        with pytest.raises(TrainingClusterError, match=message):
            launcher.run(pipeline, args, metadata_uri=cluster["metadata"])
