"""The example taxi pipeline with its root on S3 (moto on loopback): every file there, none on local disk.

The whole pipeline runs through `beam-pipeline run` in a child process (it leaves with os._exit, which
tensorflow-io's S3 filesystem needs), its working directory an empty folder that must end up holding
only the ML Metadata SQLite it was told to use. The Pusher's serving dir is a local folder elsewhere:
the Pusher only pushes to local directories today.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from beam_pipeline import Pipeline, launcher, queries
from beam_pipeline.cli import main
from beam_pipeline.errors import MetadataError, UserModuleError
from beam_pipeline.metadata import MetadataStore, connection_config
from tests import _fixtures_metadata as fm

COMPONENTS = (
    "ExampleGen",
    "StatisticsGen",
    "SchemaGen",
    "ExampleValidator",
    "Transform",
    "Trainer",
    "Evaluator",
    "Pusher",
)
OUTPUTS = {
    "ExampleGen": ("examples",),
    "StatisticsGen": ("statistics",),
    "SchemaGen": ("schema",),
    "ExampleValidator": ("anomalies",),
    "Transform": ("transform_graph", "transformed_examples"),
    "Trainer": ("model", "model_run"),
    "Evaluator": ("evaluation", "blessing"),
    "Pusher": ("pushed_model",),
}
# TensorFlow's autograph writes the sources it generates to the temp dir and removes them at interpreter
# exit, which the CLI skips (os._exit); they are TensorFlow's, not the pipeline's.
AUTOGRAPH = re.compile(r"^__autograph_generated_file\w+\.py$")


def _cli(*args: str, cwd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beam_pipeline", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": fm.ROOT, **(env or {})},
    )


def _files_under(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, files in os.walk(directory) for f in files)


def _keys(s3_server, bucket: str) -> list[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket.removeprefix("s3://"))
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# -- no store on an object store -----------------------------------------------------------------------
def test_run_refuses_a_remote_root_without_a_metadata_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = fm._example_module().create_pipeline(
        pipeline_root="s3://no-such-bucket/root", serving_model_dir=str(tmp_path / "serving")
    )
    with pytest.raises(MetadataError, match=r"s3://.*--metadata-uri.*local SQLite path.*mysql://"):
        launcher.run(pipeline)
    assert os.listdir(tmp_path) == []  # no `s3:/no-such-bucket/root/metadata.sqlite` made here


def test_cli_refuses_a_remote_root_without_a_metadata_uri(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {"SERVING_MODEL_DIR": str(tmp_path / "serving"), "BEAM_PIPELINE_METADATA_URI": ""}
    done = _cli("run", fm.TAXI_PIPELINE, "--pipeline-root", "s3://no-such-bucket/root", cwd=str(work), env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: pipeline root s3://no-such-bucket/root is on s3://" in done.stderr
    assert "pass --metadata-uri" in done.stderr
    assert "s3:/no-such-bucket" not in done.stdout + done.stderr.replace("s3://no-such-bucket", "")
    assert "Traceback" not in done.stderr and "no report" not in done.stderr
    assert os.listdir(work) == []


def test_a_sqlite_store_on_an_object_store_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("s3://b/metadata.sqlite", "sqlite://gs://b/metadata.sqlite"):
        with pytest.raises(MetadataError, match=r"must be a local file path.*mysql://"):
            connection_config(uri)
        with pytest.raises(MetadataError, match="must be a local file path"):
            queries.open_store(uri)
    with pytest.raises(MetadataError, match="pass --metadata-uri"):
        queries.store_uri(None, "s3://b/root")
    assert os.listdir(tmp_path) == []


def test_inspect_commands_refuse_a_remote_root_without_a_metadata_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BEAM_PIPELINE_METADATA_URI", raising=False)
    result = CliRunner().invoke(main, ["runs", "--pipeline-root", "s3://b/root"])
    assert result.exit_code == 1
    assert "s3://b/root is on s3://" in result.output and "--metadata-uri" in result.output
    assert os.listdir(tmp_path) == []


# -- a spawned trainer reaches the store -----------------------------------------------------------------
def _staged_run_fn_name(module_uri: str) -> str:
    """In a fresh interpreter: load the user module from the object store, as a spawned Trainer does."""
    from transforms import _user_module

    module = _user_module.load_module(module_uri, ["run_fn"], "Trainer")
    return module.run_fn.__name__


def test_a_fresh_training_process_loads_the_staged_module_from_s3(s3_bucket):
    from beam_pipeline import remote_fs, staging
    from runners import training

    remote_fs.enable_for([s3_bucket])
    staged = staging.stage(f"{s3_bucket}/root", fm.TAXI_MODULE)
    assert staged.startswith(f"{s3_bucket}/root/_staged/")
    assert training.run_in_fresh_process(_staged_run_fn_name, staged, paths=[staged]) == "run_fn"


# -- a failure leaves nothing on S3 ----------------------------------------------------------------------
FAILING_RUN_FN = """

def run_fn(fn_args):  # replaces the example's: writes part of its outputs, then fails
    tf.io.gfile.makedirs(fn_args.model_run_dir)
    with tf.io.gfile.GFile(fn_args.model_run_dir + "/partial.txt", "w") as f:
        f.write("half")
    with tf.io.gfile.GFile(fn_args.serving_model_dir + "/saved_model.pb", "w") as f:
        f.write("half")
    raise RuntimeError("the trainer broke after writing")
"""


@pytest.mark.slow
def test_a_failed_component_leaves_no_objects_on_s3(s3_server, s3_bucket, tmp_path):
    module = fm.write_module(str(tmp_path / "taxi_utils.py"))
    with open(module, "a") as f:
        f.write(FAILING_RUN_FN)
    data = fm.sample_csv(str(tmp_path / "data.csv"), rows=600)
    example = fm._example_module().create_pipeline(
        pipeline_root=f"{s3_bucket}/root", data_path=data, module_file=module, serving_model_dir=str(tmp_path / "s")
    )
    upstream = example.components[:6]
    assert [c.id for c in upstream][-1] == "Trainer"
    store = str(tmp_path / "metadata.sqlite")
    with pytest.raises(UserModuleError, match="the trainer broke after writing"):
        launcher.run(Pipeline(example.name, example.root, upstream), fm.BEAM_ARGS, metadata_uri=store)
    [run_id] = list(queries.runs(store, "chicago_taxi")["run_id"])
    executions = queries.run_executions(store, "chicago_taxi", run_id)
    states = dict(zip(executions["component_id"], executions["state"], strict=True))
    # The job stops at the failure, so a component it had not committed yet (ExampleValidator, say) fails too.
    assert states["Trainer"] == "FAILED" and states["Transform"] == "COMPLETE", states
    keys = _keys(s3_server, s3_bucket)
    for component, state in states.items():
        left = [k for k in keys if k.startswith(f"root/{component}/")]
        if state == "FAILED":
            assert not left, f"the failed {component}'s objects are still there: {left}"
        else:
            assert any(k.endswith("/_ARTIFACT.json") for k in left), f"committed {component} lost its files"


# -- the whole pipeline ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_taxi_pipeline_with_its_root_on_s3(s3_server, s3_bucket, tmp_path):
    work, temp, serving = tmp_path / "work", tmp_path / "tmp", tmp_path / "serving"
    work.mkdir()
    temp.mkdir()
    data = fm.sample_csv(str(tmp_path / "data.csv"), rows=1500)
    root = f"{s3_bucket}/root"
    env = {
        "TAXI_DATA": data,
        "TAXI_TRAIN_STEPS": str(fm.TRAIN_STEPS[0]),
        "SERVING_MODEL_DIR": str(serving),
        "TMPDIR": str(temp),
    }
    args = ["run", fm.TAXI_PIPELINE, "--pipeline-root", root, "--metadata-uri", "metadata.sqlite", *fm.BEAM_ARGS]

    first = _cli(*args, cwd=str(work), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert os.listdir(work) == ["metadata.sqlite"], "the run wrote to the working directory"
    assert [f for f in _files_under(str(temp)) if not AUTOGRAPH.match(f)] == []

    store = MetadataStore(str(work / "metadata.sqlite"))
    [first_run] = list(queries.runs(store, "chicago_taxi")["run_id"])
    executions = queries.run_executions(store, "chicago_taxi", first_run)
    assert dict(zip(executions["component_id"], executions["state"], strict=True)) == dict.fromkeys(
        COMPONENTS, "COMPLETE"
    )
    artifacts = {}
    for row in executions.itertuples():
        by_id = {a.id: a for a in store.get_artifacts(row.outputs.values())}
        artifacts.update({(row.component_id, name): by_id[aid] for name, aid in row.outputs.items()})
    assert set(artifacts) == {(c, out) for c, outs in OUTPUTS.items() for out in outs}
    assert all(a.uri.startswith(f"{root}/{c}/{out}/") for (c, out), a in artifacts.items())

    keys = _keys(s3_server, s3_bucket)
    prefix = "root/"

    def under(component: str, output: str) -> list[str]:
        uri = artifacts[component, output].uri.removeprefix(f"{s3_bucket}/")
        return [k.removeprefix(uri + "/") for k in keys if k.startswith(uri + "/")]

    for (component, output), _ in artifacts.items():
        assert "_ARTIFACT.json" in under(component, output), f"{component}.{output} has no commit marker on S3"
    assert {"Split-train/part-00000.parquet", "Split-eval/part-00000.parquet"} <= set(under("ExampleGen", "examples"))
    assert {"Split-train/FeatureStats.pb", "Split-eval/FeatureStats.pb"} <= set(under("StatisticsGen", "statistics"))
    assert "schema.pbtxt" in under("SchemaGen", "schema")
    assert {"transform_fn/saved_model.pb", "transformed_metadata/schema.pbtxt"} <= set(
        under("Transform", "transform_graph")
    )
    assert any(k.startswith("Split-train/transformed_examples-") for k in under("Transform", "transformed_examples"))
    assert {"Format-Serving/saved_model.pb", "Format-Serving/variables/variables.index"} <= set(
        under("Trainer", "model")
    )
    logs = under("Trainer", "model_run")
    assert any(re.match(r"train/events\.out\.tfevents\.", k) for k in logs), logs  # TensorBoard's
    assert any(k.startswith("metrics-") for k in under("Evaluator", "evaluation"))
    assert "validation.json" in under("Evaluator", "blessing")
    assert "push_result.json" in under("Pusher", "pushed_model")
    assert any(re.fullmatch(rf"{prefix}_staged/[0-9a-f]+/taxi_utils\.py", k) for k in keys), keys
    assert f"{prefix}reports/{first_run}/index.html" in keys
    assert f"Report: {root}/reports/{first_run}/index.html" in first.stdout
    # Nothing half-published or left behind: no temp names, no TFT or Beam temp dirs.
    assert not [k for k in keys if re.search(r"\.tmp-|\.tft_temp|beam-temp|\.push-tmp-", k)]
    assert all(k.startswith(prefix) for k in keys)

    # The staged copy, not the driver's file, is what the executions record and a worker loads.
    trainer_id = int(executions.loc[executions["component_id"] == "Trainer", "id"].iloc[0])
    [trainer] = store.mlmd.get_executions_by_id([trainer_id])
    staged = json.loads(queries.prop_value(trainer, "staged_modules"))
    assert re.fullmatch(rf"{root}/_staged/[0-9a-f]+/taxi_utils\.py", staged["module_file"]), staged

    second = _cli(*args, cwd=str(work), env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    runs = list(queries.runs(store, "chicago_taxi")["run_id"])
    [second_run] = [r for r in runs if r != first_run]
    again = queries.run_executions(store, "chicago_taxi", second_run)
    assert dict(zip(again["component_id"], again["state"], strict=True)) == dict.fromkeys(COMPONENTS, "CACHED")
    assert os.listdir(work) == ["metadata.sqlite"]
    assert f"{prefix}reports/{second_run}/index.html" in _keys(s3_server, s3_bucket)

    # The commands that read the store open the artifacts on S3 and write their pages there.
    cli_store = ["--metadata-uri", str(work / "metadata.sqlite")]
    model_id = artifacts["Trainer", "model"].id
    runner = CliRunner()
    for args, written in (
        (["report", *cli_store, "--pipeline", "chicago_taxi", "--out", f"{s3_bucket}/pages"], "pages/index.html"),
        (["lineage", *cli_store, str(model_id), "--out", f"{s3_bucket}/pages/lineage.svg"], "pages/lineage.svg"),
        (["model-metrics", *cli_store, str(model_id), "--out", f"{s3_bucket}/pages/m.html"], "pages/m.html"),
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert written in _keys(s3_server, s3_bucket)
    board = queries.start_tensorboard(store, [model_id])
    try:
        assert board.logdirs == {f"model_{model_id}": artifacts["Trainer", "model_run"].uri}
    finally:
        board.stop()
