"""Trainer(num_workers=N): MultiWorkerMirroredStrategy over N processes, and the rendezvous they meet in.

The in-process runner runs the N workers as local processes; the portable runner places them as N
Beam elements on N SDK workers (tests/test_multi_worker_portable.py). Both train the taxi model.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest

from beam_pipeline.dsl import SCRATCH_DIR
from beam_pipeline.errors import PipelineDefinitionError, TrainingClusterError, UserModuleError
from runners.training_cluster import Rendezvous, parallelism_hint
from tests._multi_worker import read_records, write_recording_module
from tests.helpers import executions_by_state, run_components, store_at
from tests.test_trainer import taxi_trainer_components
from tests.test_transform import taxi_sample
from transforms.trainer import SERVING_DIR, Trainer

STEPS = 20
BATCH = 32


# -- the rendezvous, on a local directory ---------------------------------------------------------


def _join_in_thread(rendezvous: Rendezvous, index: int, address: str, out: dict) -> threading.Thread:
    def join() -> None:
        try:
            out[index] = rendezvous.join(index, address)
        except TrainingClusterError as e:
            out[index] = e

    thread = threading.Thread(target=join)
    thread.start()
    return thread


def test_tasks_that_join_all_get_the_same_cluster_in_task_order(tmp_path):
    rendezvous = Rendezvous(str(tmp_path / "meet"), 3, timeout_s=60)
    out: dict = {}
    threads = [_join_in_thread(rendezvous, i, f"host{i}:{1000 + i}", out) for i in (2, 0, 1)]
    for thread in threads:
        thread.join()
    assert out == {i: ["host0:1000", "host1:1001", "host2:1002"] for i in range(3)}
    rendezvous.remove()
    assert not (tmp_path / "meet").exists()


def test_a_task_alone_times_out_saying_the_runner_needs_parallelism(tmp_path):
    rendezvous = Rendezvous(str(tmp_path / "meet"), 2, timeout_s=1)
    message = r"only 1 of 2 training workers started within 1 s: the runner must run 2 bundles at once"
    with pytest.raises(TrainingClusterError, match=message):
        rendezvous.join(0, "host0:1")
    # The peer that starts after the timeout stops at once with the same reason instead of waiting.
    with pytest.raises(TrainingClusterError, match="training task 0 failed: only 1 of 2"):
        Rendezvous(str(tmp_path / "meet"), 2, timeout_s=60).join(1, "host1:1")


def test_a_failed_task_stops_the_peers_waiting_for_it(tmp_path):
    rendezvous = Rendezvous(str(tmp_path / "meet"), 3, timeout_s=60)
    out: dict = {}
    thread = _join_in_thread(rendezvous, 0, "host0:1", out)
    rendezvous.fail(2, "its SDK worker ran out of memory")
    thread.join()
    assert str(out[0]) == "training task 2 failed: its SDK worker ran out of memory"


def test_a_task_started_twice_in_a_run_is_refused(tmp_path):
    """A runner's retry of a lost task: a MultiWorkerMirroredStrategy cluster cannot take it back."""
    first = Rendezvous(str(tmp_path / "meet"), 2, timeout_s=1)
    with pytest.raises(TrainingClusterError):
        first.join(0, "host0:1")
    (tmp_path / "meet" / "failed-0.txt").unlink()
    with pytest.raises(TrainingClusterError, match="training task 0 started a second time in this run"):
        Rendezvous(str(tmp_path / "meet"), 2, timeout_s=60).join(0, "host0:2")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_training_process_dies_with_the_worker_that_started_it(tmp_path):
    """A runner may SIGKILL an SDK worker mid-training: its training process must not go on alone."""
    script = (
        "import sys, time\n"
        "from runners.training_cluster import TrainingProcess\n"
        "p = TrainingProcess('t', time.sleep, (600,), {}, [])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"training process {child} outlived its parent"


def test_the_parallelism_hint_names_each_runners_option():
    hint = parallelism_hint(3)
    for option in ("--sdk_worker_parallelism=3", "--parallelism=3", "local[3]", "--num_workers=3"):
        assert option in hint


@pytest.mark.parametrize(
    "params, message",
    [
        ({"num_workers": 2}, "num_workers=2 needs strategy='multi_worker_mirrored', not 'default'"),
        ({"strategy": "multi_worker_mirrored", "num_workers": 0}, "num_workers=0: expected a positive integer"),
        ({"strategy": "multi_worker_mirrored", "num_workers": 2.0}, "num_workers=2.0: expected a positive integer"),
        ({"strategy": "multi_worker_mirrored", "rendezvous_timeout_s": 0}, "rendezvous_timeout_s=0"),
    ],
)
def test_bad_multi_worker_configuration_is_refused_when_defined(params, message):
    from tests.test_trainer import trainer_channels
    from tests.test_transform import TAXI_MODULE

    examples, graph, schema = trainer_channels()
    with pytest.raises(PipelineDefinitionError, match=message):
        Trainer(examples=examples, transform_graph=graph, schema=schema, module_file=TAXI_MODULE, **params)


def test_the_rendezvous_timeout_is_not_part_of_the_cache_key():
    from tests.test_trainer import trainer_channels
    from tests.test_transform import TAXI_MODULE

    examples, graph, _ = trainer_channels()
    a, b = (
        Trainer(
            examples=examples,
            transform_graph=graph,
            module_file=TAXI_MODULE,
            strategy="multi_worker_mirrored",
            num_workers=2,
            rendezvous_timeout_s=timeout,
        )
        for timeout in (30, 300)
    )
    assert a.exec_properties() == b.exec_properties()
    assert a.exec_properties()["num_workers"] == 2


def test_workers_shard_by_file_only_when_there_is_a_file_for_each(tmp_path):
    import tensorflow as tf

    from transforms._fn_args import FnArgs

    for n in range(3):
        (tmp_path / f"part-{n}.gz").write_bytes(b"")
    fn_args = FnArgs([], [], "", "", "", train_steps=1, eval_steps=1, num_workers=3)
    policy = tf.data.experimental.AutoShardPolicy
    pattern = [str(tmp_path / "*.gz")]
    assert fn_args._shard_options(pattern).experimental_distribute.auto_shard_policy == policy.FILE
    fn_args.num_workers = 4
    assert fn_args._shard_options(pattern).experimental_distribute.auto_shard_policy == policy.DATA


# -- two workers on the in-process runner -------------------------------------------------------------


@pytest.fixture(scope="module")
def taxi(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_worker")
    return {
        "root": tmp / "root",
        "data": taxi_sample(str(tmp / "taxi.csv")),
        "module": write_recording_module(str(tmp)),
        "tmp": tmp,
    }


def run_two_workers(taxi, record_dir, **custom):
    components = taxi_trainer_components(
        taxi["data"],
        module_file=taxi["module"],
        train_steps=STEPS,
        strategy="multi_worker_mirrored",
        num_workers=2,
        hyperparameters={"batch_size": BATCH},
        custom_config={"record_dir": str(record_dir), **custom},
    )
    return run_components(taxi["root"], components, name="taxi")


@pytest.mark.slow
def test_two_workers_on_the_in_process_runner_train_one_model(taxi, tmp_path, caplog):
    import tensorflow as tf

    caplog.set_level(logging.INFO, logger="runners.training_cluster")
    result = run_two_workers(taxi, tmp_path)
    assert "in-process runner: the 2 training workers run as local processes" in caplog.text
    records = read_records(str(tmp_path))
    assert sorted(records) == [0, 1]
    for index, record in records.items():
        assert record["num_workers"] == 2 and record["replicas"] == 2
        assert record["is_chief"] == (index == 0)
        assert record["local_batch"] == BATCH // 2, "each worker gets its half of the global batch"
        assert record["steps"] == STEPS, "each worker ran every step"
        assert record["tf_config"]["task"] == {"type": "worker", "index": index}
        assert len(record["tf_config"]["cluster"]["worker"]) == 2
    assert records[0]["pid"] != records[1]["pid"]
    run = result.artifact("Trainer", "model_run").properties
    assert (run["strategy"], run["num_workers"], run["num_replicas"]) == ("multi_worker_mirrored", 2, 2)
    tasks = json.loads(run["tasks"])
    assert {t["pid"] for t in tasks} == {r["pid"] for r in records.values()}
    assert tasks[0]["parent_pid"] == tasks[1]["parent_pid"] == os.getpid(), "both started by this process"
    model = tf.saved_model.load(os.path.join(result.artifact("Trainer", "model").uri, SERVING_DIR))
    assert "serving_default" in model.signatures
    assert not (taxi["root"] / SCRATCH_DIR).exists() or not any((taxi["root"] / SCRATCH_DIR).iterdir())


@pytest.mark.slow
def test_a_worker_that_raises_fails_the_trainer_and_a_rerun_succeeds(taxi, tmp_path):
    failed = r"run_fn in .* raised ValueError: task 1 fails on purpose"
    with pytest.raises((UserModuleError, TrainingClusterError), match=failed):
        run_two_workers(taxi, tmp_path / "failed", fail_task=1)
    store = store_at(taxi["root"])
    assert "Trainer" in executions_by_state(store)["FAILED"]
    failed = [e for e in store.mlmd.get_executions() if e.properties["component_id"].string_value == "Trainer"][-1]
    outputs = [a.id for a in store.mlmd.get_events_by_execution_ids([failed.id]) if a.type == a.OUTPUT]
    assert outputs == [], "a failed Trainer publishes no model"
    result = run_two_workers(taxi, tmp_path / "rerun")
    assert result.components["Trainer"].state == "COMPLETE"
    assert sorted(read_records(str(tmp_path / "rerun"))) == [0, 1]
