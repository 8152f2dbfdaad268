"""Every way a run can end leaves no execution RUNNING and nothing half-written published."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import Pipeline, artifact_io, launcher, queries
from beam_pipeline.errors import MetadataError, UserModuleError
from beam_pipeline.metadata import ABANDONED_PREFIX, MetadataStore
from tests._blocking import write_pipeline_file
from tests.helpers import executions_by_state, store_at
from transforms.example_gen import ExampleGen
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.transform import Transform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_S = 300.0  # generous: the suite runs on a busy 2-core machine


def _data(tmp_path, taxi_small_csv) -> str:
    path = tmp_path / "in" / "data.csv"
    path.parent.mkdir(exist_ok=True)
    shutil.copy(taxi_small_csv, path)
    return str(path)


def _wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the launcher exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _states(root) -> dict[str, list[str]]:
    path = os.path.join(str(root), "metadata.sqlite")
    return executions_by_state(MetadataStore(path)) if os.path.exists(path) else {}


def _start_cli(pipeline_file: str, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1"}

    def ignore_sigint():  # as in a shell's background job: the run must stop on SIGINT all the same
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    log = open(tmp_path / "cli.log", "ab")  # the child keeps it; closed when the test's tmp dir goes
    return subprocess.Popen(
        [sys.executable, "-m", "beam_pipeline", "run", pipeline_file],
        cwd=str(tmp_path),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=ignore_sigint,
        start_new_session=True,
    )


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


@pytest.fixture
def held(tmp_path, taxi_small_csv):
    """A pipeline file whose last component waits for a release flag, and its root and flags dir."""
    flags = tmp_path / "flags"
    flags.mkdir()
    root = tmp_path / "root"
    path = write_pipeline_file(
        str(tmp_path / "held_pipeline.py"),
        repo=REPO,
        root=str(root),
        data=_data(tmp_path, taxi_small_csv),
        flags=str(flags),
    )
    return {"file": path, "root": root, "flags": flags}


def _hold_running(held, process):
    """Wait until Hold runs and everything upstream of it is published."""
    _wait_for(lambda: (held["flags"] / "started").exists(), "Hold to start", process)
    _wait_for(
        lambda: sorted(_states(held["root"]).get("COMPLETE", [])) == ["ExampleGen", "StatisticsGen"],
        "ExampleGen and StatisticsGen to be published",
        process,
    )


def _run_to_completion(pipeline_file: str, tmp_path, root, pipeline_name: str):
    """Run the CLI to its end (it must succeed); the store and its newest run's states by component."""
    rerun = subprocess.run(
        [sys.executable, "-m", "beam_pipeline", "run", pipeline_file],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1"},
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    store = store_at(root)
    [run_id] = queries.runs(store, pipeline_name)["run_id"][:1]
    executions = queries.run_executions(store, pipeline_name, run_id)
    return store, {row.component_id: row.state for row in executions.itertuples()}


def _rerun_completes(held, tmp_path):
    (held["flags"] / "release").touch()
    store, states = _run_to_completion(held["file"], tmp_path, held["root"], "held")
    assert states == {"ExampleGen": "CACHED", "StatisticsGen": "CACHED", "Hold": "COMPLETE"}
    return store


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_records_canceled_and_a_rerun_resumes(held, tmp_path, sig):
    process = _start_cli(held["file"], tmp_path)
    try:
        _hold_running(held, process)
        process.send_signal(sig)
        assert process.wait(timeout=WAIT_S) == 130
    finally:
        _kill(process)
    states = _states(held["root"])
    assert states == {"COMPLETE": ["ExampleGen", "StatisticsGen"], "CANCELED": ["Hold"]}, states
    [hold] = [
        e for e in store_at(held["root"]).mlmd.get_executions() if e.properties["component_id"].string_value == "Hold"
    ]
    assert "KeyboardInterrupt" in hold.custom_properties["error"].string_value
    report_dir = held["root"] / "Hold" / "report"
    assert not report_dir.exists() or not os.listdir(report_dir)  # nothing half-written left behind
    _rerun_completes(held, tmp_path)


@pytest.mark.slow
def test_a_killed_launcher_is_shown_abandoned_and_the_rerun_resumes(held, tmp_path):
    process = _start_cli(held["file"], tmp_path)
    try:
        _hold_running(held, process)
        [hold] = [
            e
            for e in store_at(held["root"]).mlmd.get_executions()
            if e.properties["component_id"].string_value == "Hold"
        ]
        half_written = json.loads(hold.custom_properties["output_uris"].string_value)["report"]
        os.makedirs(half_written, exist_ok=True)
        open(os.path.join(half_written, "partial"), "w").close()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        _kill(process)
    store = store_at(held["root"])
    assert _states(held["root"])["RUNNING"] == ["Hold"]  # nobody could record anything
    assert queries.runs(store, "held")["state"].tolist() == ["ABANDONED"]  # but it is not shown as running

    store = _rerun_completes(held, tmp_path)
    [old] = [e for e in store.mlmd.get_executions_by_id([hold.id])]
    assert old.last_known_state == mlmd_pb2.Execution.FAILED
    assert old.custom_properties["error"].string_value.startswith(ABANDONED_PREFIX)
    assert not os.path.exists(half_written)  # the sweep removed what the dead run had half-written
    published = {a.uri for a in store.get_artifacts(a.id for a in store.mlmd.get_artifacts())}
    assert half_written not in published
    assert queries.runs(store, "held")["state"].tolist() == ["COMPLETE", "ABANDONED"]


def test_a_live_launcher_s_executions_are_not_swept(tmp_path, taxi_small_csv):
    """A concurrent run on this host is alive: its RUNNING executions stay RUNNING."""
    store = MetadataStore(str(tmp_path / "m.sqlite"))
    contexts = store.run_contexts("p", "run1")
    execution_id = store.start_execution(
        "Hold", "Hold", pipeline_name="p", run_id="run1", config={}, cache_key="", contexts=contexts
    )
    assert store.sweep_abandoned("p") == []
    # The same record, as a dead process would have left it: a pid that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    [ctx] = store.mlmd.get_contexts_by_id([contexts[1].id])
    identity = json.loads(ctx.custom_properties["launcher"].string_value)
    ctx.custom_properties["launcher"].string_value = json.dumps({**identity, "pid": dead.pid, "pid_start": "1"})
    store.mlmd.put_contexts([ctx])
    [swept] = store.sweep_abandoned("p")
    assert swept["id"] == execution_id


def test_a_remote_launcher_is_abandoned_only_after_its_heartbeat_goes_stale(tmp_path):
    store = MetadataStore(str(tmp_path / "m.sqlite"))
    contexts = store.run_contexts("p", "run1")
    store.start_execution("Hold", "Hold", pipeline_name="p", run_id="run1", config={}, cache_key="", contexts=contexts)
    [ctx] = store.mlmd.get_contexts_by_id([contexts[1].id])
    ctx.custom_properties["launcher"].string_value = json.dumps({"host": "elsewhere", "pid": 1, "pid_start": "1"})
    store.mlmd.put_contexts([ctx])
    assert store.sweep_abandoned("p") == []
    assert len(store.sweep_abandoned("p", stale_after_s=-1)) == 1


def test_an_error_while_building_the_graph_fails_every_registered_execution(tmp_path, taxi_small_csv):
    """A preprocessing_fn that raises while tf.Transform traces it: nothing stays RUNNING."""
    module = tmp_path / "bad_module.py"
    module.write_text("def preprocessing_fn(inputs):\n    raise ValueError('no such feature: tips_typo')\n")
    gen = ExampleGen(input_base=_data(tmp_path, taxi_small_csv))
    stats = StatisticsGen(examples=gen.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    transform = Transform(examples=gen.outputs.examples, schema=schema.outputs.schema, module_file=str(module))
    pipeline = Pipeline("bad_transform", str(tmp_path / "root"), [gen, stats, schema, transform])
    with pytest.raises(UserModuleError, match="tips_typo"):
        launcher.run(pipeline)
    states = executions_by_state(store_at(tmp_path / "root"))
    assert set(states) == {"FAILED"}, states
    # Transform fails while it is planned (tracing needs only the schema), before it is registered.
    assert sorted(states["FAILED"]) == ["ExampleGen", "SchemaGen", "StatisticsGen"]
    errors = {e.custom_properties["error"].string_value for e in store_at(tmp_path / "root").mlmd.get_executions()}
    assert all("before the job started" in e and "tips_typo" in e for e in errors), errors


def test_a_store_error_while_publishing_fails_the_run_and_leaves_nothing_running(tmp_path, taxi_small_csv, monkeypatch):
    gen = ExampleGen(input_base=_data(tmp_path, taxi_small_csv))
    stats = StatisticsGen(examples=gen.outputs.examples)
    pipeline = Pipeline("store_error", str(tmp_path / "root"), [gen, stats])
    real = MetadataStore.finish_execution

    def flaky_publish(self, execution_id, *, state, **kwargs):
        if state == mlmd_pb2.Execution.COMPLETE:
            raise MetadataError("ML Metadata store: publishing an execution failed: connection reset")
        return real(self, execution_id, state=state, **kwargs)

    monkeypatch.setattr(MetadataStore, "finish_execution", flaky_publish)
    with pytest.raises(MetadataError, match="connection reset"):
        launcher.run(pipeline)
    monkeypatch.undo()
    states = executions_by_state(store_at(tmp_path / "root"))
    assert states == {"FAILED": ["ExampleGen", "StatisticsGen"]}, states
    assert not os.listdir(tmp_path / "root" / "ExampleGen" / "examples")
    assert set(queries.runs(store_at(tmp_path / "root"), "store_error")["state"]) == {"FAILED"}


def test_commit_markers_are_whole_or_absent(tmp_path):
    uri = str(tmp_path / "artifact")
    os.makedirs(uri)
    assert artifact_io.read_marker(uri) is None
    with open(os.path.join(uri, "_ARTIFACT.json"), "w") as f:
        f.write('{"properties": {"split_na')  # what a reader could see of a non-atomic write
    assert artifact_io.read_marker(uri) is None
    artifact_io.write_text_atomic(os.path.join(uri, "_ARTIFACT.json"), json.dumps({"properties": {"a": 1}}))
    assert artifact_io.read_marker(uri) == {"properties": {"a": 1}}
    assert os.listdir(uri) == ["_ARTIFACT.json"]  # no temp file left


def test_a_partly_deleted_artifact_is_not_reused(tmp_path, taxi_small_csv):
    def pipeline():
        gen = ExampleGen(input_base=_data(tmp_path, taxi_small_csv))
        return Pipeline("partial", str(tmp_path / "root"), [gen, StatisticsGen(examples=gen.outputs.examples)])

    first = launcher.run(pipeline())
    examples = first.artifact("ExampleGen", "examples")
    assert artifact_io.is_intact(examples.uri)
    [part, *_] = sorted(m.path for m in artifact_io.FileSystems.match([examples.uri + "/**.parquet"])[0].metadata_list)
    os.remove(part)
    assert not artifact_io.is_intact(examples.uri)
    again = launcher.run(pipeline())
    assert {c.id: c.state for c in again.components.values()} == {"ExampleGen": "COMPLETE", "StatisticsGen": "COMPLETE"}


TAXI_KILL_PIPELINE = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {examples!r})
import pipeline as taxi


def create_pipeline(pipeline_root={root!r}):
    return taxi.create_pipeline(
        pipeline_root=pipeline_root, data_path={data!r}, train_steps=40, module_file={module!r}
    )
"""

TAXI_KILL_MODULE = '''
"""The taxi module, with a run_fn that says it started and trains once released."""
import os
import sys
import time

sys.path.insert(0, {examples!r})
from taxi_utils import *  # noqa: F403
import taxi_utils


def run_fn(fn_args):
    open({started!r}, "a").close()
    deadline = time.monotonic() + 600
    while not os.path.exists({release!r}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return taxi_utils.run_fn(fn_args)
'''


@pytest.mark.slow
def test_killing_the_taxi_launcher_while_the_trainer_runs_then_rerunning(tmp_path, taxi_small_csv):
    """kill -9 mid-training: nothing of that Trainer is published; the rerun reuses what committed."""
    examples = os.path.join(REPO, "examples", "chicago_taxi")
    started, release = tmp_path / "trainer_started", tmp_path / "trainer_release"
    module = tmp_path / "taxi_module.py"
    module.write_text(TAXI_KILL_MODULE.format(examples=examples, started=str(started), release=str(release)))
    root = tmp_path / "root"
    pipeline_file = tmp_path / "taxi_pipeline.py"
    pipeline_file.write_text(
        TAXI_KILL_PIPELINE.format(
            repo=REPO, examples=examples, root=str(root), data=_data(tmp_path, taxi_small_csv), module=str(module)
        )
    )
    process = _start_cli(str(pipeline_file), tmp_path)
    try:
        _wait_for(started.exists, "the Trainer's run_fn to start", process)
        # Transform committed before run_fn started; wait until the driver published it too. (The
        # in-process runner runs one stage at a time: ExampleValidator may still be waiting.)
        upstream = ["ExampleGen", "SchemaGen", "StatisticsGen", "Transform"]
        _wait_for(
            lambda: sorted(_states(root).get("COMPLETE", [])) == upstream, "Transform and upstream published", process
        )
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        _kill(process)
    store = store_at(root)
    before = _states(root)
    assert before["RUNNING"] and "Trainer" in before["RUNNING"], before
    [trainer] = [
        e
        for e in store.mlmd.get_executions()
        if e.properties["component_id"].string_value == "Trainer" and e.last_known_state == e.RUNNING
    ]
    model_dir = json.loads(trainer.custom_properties["output_uris"].string_value)["model"]
    committed = {a.id: a.uri for a in store.get_artifacts(a.id for a in store.mlmd.get_artifacts())}
    assert model_dir not in committed.values()  # nothing half-written was ever published
    release.touch()
    store, states = _run_to_completion(str(pipeline_file), tmp_path, root, "chicago_taxi")
    reused = {c for c, s in states.items() if s == "CACHED"}
    assert reused >= {"ExampleGen", "StatisticsGen", "SchemaGen", "Transform"}, states
    assert states["Trainer"] == "COMPLETE" and states["Pusher"] == "COMPLETE", states
    assert "RUNNING" not in set(queries.runs(store, "chicago_taxi")["state"])
    assert not os.path.exists(model_dir)  # the dead Trainer's half-written model was removed
    for artifact in store.get_artifacts(a.id for a in store.mlmd.get_artifacts()):
        assert artifact_io.is_intact(artifact.uri), artifact.uri  # every published artifact is whole
