"""ML Metadata on a real MariaDB server: two pipeline runs writing to one store at the same time lose nothing.

The fixture starts Debian's MariaDB on loopback with a private data directory and no grant tables,
so no system service or password is involved; it is skipped only when the server is not installed
or cannot start, and then fails instead when CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import queries, report
from beam_pipeline.metadata import MetadataStore
from tests import _fixtures_metadata as fm
from tests.helpers import require

MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
STARTUP_ATTEMPTS = 120  # polls of 0.5 s for the server to accept connections


def _accepts(sock: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(sock)
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    """A private MariaDB on a Unix socket in a temp dir (no TCP port another suite could take);
    yields the socket's path and stops the server afterwards."""
    if MARIADBD is None or INSTALL_DB is None:
        require(False, "MariaDB server not installed (apt-get install mariadb-server)")
    base = tmp_path_factory.mktemp("mariadb")
    datadir, log = base / "data", base / "server.log"
    as_root = ["--user=root"] if os.geteuid() == 0 else []
    install = subprocess.run(
        [INSTALL_DB, "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
         "--skip-test-db", *as_root],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if install.returncode != 0:
        require(False, f"mariadb-install-db failed: {install.stderr[-500:]}")
    sock = str(base / "mysqld.sock")
    server = subprocess.Popen(
        [MARIADBD, "--no-defaults", f"--datadir={datadir}", f"--socket={sock}", "--skip-networking",
         "--skip-grant-tables", "--skip-name-resolve", f"--log-error={log}",
         f"--pid-file={base / 'mysqld.pid'}", *as_root],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(STARTUP_ATTEMPTS):
            if server.poll() is not None or _accepts(sock):
                break
            time.sleep(0.5)
        if server.poll() is not None or not _accepts(sock):
            require(False, f"MariaDB did not start: {log.read_text()[-800:] if log.exists() else 'no log'}")
        yield sock
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_two_concurrent_runs_share_one_mysql_store(mariadb, tmp_path):
    uri = f"mysql://root@localhost/beam_pipeline_concurrent?socket={mariadb}"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "BEAM_PIPELINE_METADATA_URI": uri}
    runs = []
    for i, skip in enumerate((0, 6000)):
        data = fm.sample_csv(str(tmp_path / f"data{i}.csv"), rows=300, skip=skip)
        runs.append(fm.pipeline_file(str(tmp_path / f"pipeline{i}.py"), str(tmp_path / f"root{i}"), data))
    cli = [sys.executable, "-m", "beam_pipeline", "run"]
    processes = [
        subprocess.Popen([*cli, path, "--direct_num_workers=1"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for path in runs
    ]  # fmt: skip
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]

    store = MetadataStore(uri)
    table = queries.runs(store, "chicago_taxi")
    assert len(table) == 2
    assert list(table["state"]) == ["COMPLETE", "COMPLETE"] and list(table["components"]) == [4, 4]
    executions = [queries.run_executions(store, "chicago_taxi", run_id) for run_id in table["run_id"]]
    roots = set()
    for frame in executions:
        assert sorted(frame["component_id"]) == ["ExampleGen", "ExampleValidator", "SchemaGen", "StatisticsGen"]
        assert set(frame["state"]) == {"COMPLETE"}
        outputs_ids = [aid for outs in frame["outputs"] for aid in outs.values()]
        artifacts = store.get_artifacts(outputs_ids)
        assert len(artifacts) == 4
        for artifact in artifacts:
            assert os.path.isdir(artifact.uri), artifact.uri
        roots.add(os.path.commonpath([a.uri for a in artifacts]))
    assert roots == {str(tmp_path / "root0"), str(tmp_path / "root1")}
    assert len(store.mlmd.get_artifacts()) == 8 and len(store.mlmd.get_executions()) == 8

    # The report and the queries read a MySQL store like a SQLite one.
    path = report.write_run_report(uri, "chicago_taxi", table["run_id"].iloc[0], str(tmp_path / "report"))
    html = open(path).read()
    assert "ExampleValidator" in html and "Split train" in html
    assert queries.runs(uri)["duration_s"].notna().all()


# -- two runs racing to push ------------------------------------------------------------------------------
RACE_PIPELINE = "race"
RACE_TIMEOUT_S = 1200  # one cold pipeline run on a loaded 2-core machine takes a few minutes
RACE_TOLERANCE = 0.1  # max_regression of auc: a model this much worse than its baseline is not blessed


def _race_module(path, gate: tuple[str, str] | None = None) -> str:
    """The taxi user module with seeded initial weights; with `gate` (started, go), run_fn announces it
    started training and waits for the test's go file, so the test decides when this run may finish."""
    with open(fm.TAXI_MODULE) as f:
        text = f.read()
    started, go = gate or ("", "")
    text += textwrap.dedent(
        f"""

        # -- added by tests/test_mysql.py -------------------------------------------------------------
        _GATE = {gate is not None!r}
        _STARTED, _GO, _TIMEOUT_S = {started!r}, {go!r}, {RACE_TIMEOUT_S}
        _taxi_run_fn = run_fn


        def run_fn(fn_args):
            import time

            if _GATE:
                open(_STARTED, "w").close()
                deadline = time.monotonic() + _TIMEOUT_S
                while not os.path.exists(_GO):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the test never created {{_GO}}")
                    time.sleep(0.05)
            tf.keras.utils.set_random_seed(0)  # equal initial weights: an untrained model is always the same
            _taxi_run_fn(fn_args)
        """
    )
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _race_pipeline_file(path, base, module_file: str, trainer_args: dict) -> str:
    """A pipeline file for `beam-pipeline run`: the taxi components, one change-threshold Evaluator, a Pusher."""
    text = f"""
from beam_pipeline import Pipeline
from transforms.evaluator import Evaluator, binary_classification_eval_config
from transforms.example_gen import ExampleGen
from transforms.pusher import Pusher
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.trainer import Trainer
from transforms.transform import Transform


def create_pipeline(pipeline_root={str(base / "root")!r}):
    example_gen = ExampleGen(input_base={str(base / "data.csv")!r})
    statistics_gen = StatisticsGen(examples=example_gen.outputs.examples)
    schema_gen = SchemaGen(statistics=statistics_gen.outputs.statistics)
    transform = Transform(examples=example_gen.outputs.examples, schema=schema_gen.outputs.schema,
                          module_file={fm.TAXI_MODULE!r})
    trainer = Trainer(examples=transform.outputs.transformed_examples,
                      transform_graph=transform.outputs.transform_graph, schema=schema_gen.outputs.schema,
                      module_file={module_file!r}, eval_steps=5, **{trainer_args!r})
    evaluator = Evaluator(examples=example_gen.outputs.examples, model=trainer.outputs.model,
                          eval_config=binary_classification_eval_config("tips_xf",
                                                                        max_regression={{"auc": {RACE_TOLERANCE}}}))
    pusher = Pusher(model=trainer.outputs.model, blessing=evaluator.outputs.blessing,
                    serving_model_dir={str(base / "serving")!r})
    return Pipeline({RACE_PIPELINE!r}, pipeline_root,
                    [example_gen, statistics_gen, schema_gen, transform, trainer, evaluator, pusher])
"""
    with open(path, "w") as f:
        f.write(text)
    return str(path)


class _Launch:
    """One `beam-pipeline run` in its own process, its output in a log file (a pipe could fill and block it)."""

    def __init__(self, pipeline_file: str, env: dict[str, str], log_path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "beam_pipeline", "run", pipeline_file, *fm.BEAM_ARGS],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def wait_ok(self) -> None:
        returncode = self.process.wait(timeout=RACE_TIMEOUT_S)
        assert returncode == 0, self.output()

    def wait_for_file(self, path) -> None:
        """Wait until `path` exists, failing at once if the run ends first."""
        deadline = time.monotonic() + RACE_TIMEOUT_S
        while not os.path.exists(path):
            assert self.process.poll() is None, f"the run ended before creating {path}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {path} after {RACE_TIMEOUT_S} s:\n{self.output()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _trainer_models(store: MetadataStore) -> dict[str, list[str]]:
    """Model URIs by the Trainer's module file, in execution order."""
    models: dict[str, list[str]] = {}
    for e in sorted(store.mlmd.get_executions_by_type("Trainer"), key=lambda e: e.id):
        if e.last_known_state == mlmd_pb2.Execution.COMPLETE:
            module = json.loads(e.properties["config"].string_value)["module_file"]
            models.setdefault(module, []).append(store.execution_artifacts(e.id)[1]["model"].uri)
    return models


def _overall_auc(evaluation_uri: str) -> float:
    import tensorflow_model_analysis as tfma

    for per_slice in tfma.load_metrics(evaluation_uri):
        if not per_slice.slice_key.single_slice_keys:
            for kv in per_slice.metric_keys_and_values:
                if kv.key.name == "auc" and not kv.key.is_diff and kv.key.model_name != tfma.BASELINE_KEY:
                    return kv.value.double_value.value
    raise AssertionError(f"no overall auc in {evaluation_uri}")


@pytest.fixture(scope="module")
def race(mariadb, tmp_path_factory) -> dict:
    """A baseline run pushes an untrained model; then a worse run (untrained too) and a better run (trained)
    both judge against it. The worse run is held in its Trainer until the better run has pushed and exited,
    so the worse one finishes last."""
    base = tmp_path_factory.mktemp("race")
    uri = f"mysql://root@localhost/beam_pipeline_race?socket={mariadb}"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "BEAM_PIPELINE_METADATA_URI": uri}
    fm.sample_csv(str(base / "data.csv"), rows=600)
    started, go = base / "worse_started", base / "go"
    untrained = {"train_steps": 1, "hyperparameters": {"learning_rate": 0.0}}
    modules = {
        "baseline": _race_module(base / "baseline_module.py"),
        "worse": _race_module(base / "worse_module.py", (str(started), str(go))),
        "better": _race_module(base / "better_module.py"),
    }
    files = {
        name: _race_pipeline_file(base / f"{name}.py", base, modules[name], args)
        for name, args in (("baseline", untrained), ("worse", untrained), ("better", {"train_steps": 40}))
    }
    launches: list[_Launch] = []

    def launch(name: str) -> _Launch:
        launches.append(_Launch(files[name], env, base / f"{name}.log"))
        return launches[-1]

    try:
        launch("baseline").wait_ok()
        worse = launch("worse")
        worse.wait_for_file(started)  # it resolved its baseline and is training
        launch("better").wait_ok()  # judged against the same baseline, pushed, exited
        go.touch()
        worse.wait_ok()
    finally:
        for running in launches:
            running.stop()
    store = MetadataStore(uri)
    by_module = _trainer_models(store)
    models = {name: by_module[modules[name]][0] for name in modules}
    return {"base": base, "uri": uri, "env": env, "files": files, "models": models, "store": store}


def _latest_for_model(store: MetadataStore, type_name: str, model_uri: str):
    return store.latest_artifacts(type_name, RACE_PIPELINE, {"model_uri": model_uri})[0]


def _evaluation_of(store: MetadataStore, model_uri: str) -> str:
    """The evaluation written next to the newest blessing of a model."""
    blessing = _latest_for_model(store, "ModelBlessing", model_uri)
    [event] = [e for e in store.mlmd.get_events_by_artifact_ids([blessing.id]) if e.type == mlmd_pb2.Event.OUTPUT]
    return store.execution_artifacts(event.execution_id)[1]["evaluation"].uri


@pytest.mark.slow
def test_the_worse_model_finishing_last_is_never_pushed(race):
    from transforms import _push_record as pr
    from transforms import push_model as pm

    store, models = race["store"], race["models"]
    serving = str(race["base"] / "serving")
    # Both racers were judged against the baseline and blessed: without the compare-and-set both would push.
    for name in ("worse", "better"):
        blessing = _latest_for_model(store, "ModelBlessing", models[name])
        assert (blessing.properties["blessed"], blessing.properties["baseline_model_uri"]) == (1, models["baseline"])
    auc = {name: _overall_auc(_evaluation_of(store, models[name])) for name in ("worse", "better")}
    assert auc["worse"] < auc["better"] - 2 * RACE_TOLERANCE

    # The serving directory: the baseline, then the better model; the worse one never.
    assert pm.existing_versions(serving) == [1, 2]
    served = [pr.read_push_record(os.path.join(serving, str(v)))["model_uri"] for v in (1, 2)]
    assert served == [models["baseline"], models["better"]]
    assert pm.served_model(serving).model_uri == models["better"]

    refused = _latest_for_model(store, "PushedModel", models["worse"]).properties
    assert (refused["pushed"], refused["push_refused"], refused["served_version"]) == (0, 1, 2)
    assert refused["served_model_uri"] == models["better"]
    better_run = pr.read_push_record(os.path.join(serving, "2"))["pushed_by"]
    assert refused["push_message"].startswith(
        f"model {models['worse']} not pushed: version 2 (model {models['better']}, pushed by {better_run}) won"
    )
    assert f"judged against baseline {models['baseline']}" in refused["push_message"]
    pushed = _latest_for_model(store, "PushedModel", models["better"]).properties
    assert (pushed["pushed"], pushed["pushed_version"]) == (1, 2)


@pytest.mark.slow
def test_a_rerun_of_the_refused_pipeline_judges_against_the_served_model(race):
    store, models = race["store"], race["models"]
    rerun = _Launch(race["files"]["worse"], race["env"], race["base"] / "worse_rerun.log")
    try:
        rerun.wait_ok()
    finally:
        rerun.stop()
    blessing = _latest_for_model(store, "ModelBlessing", models["worse"])
    assert blessing.properties["baseline_model_uri"] == models["better"]
    assert blessing.properties["blessed"] == 0  # far worse than the served model
