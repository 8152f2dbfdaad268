"""Portable runners: the whole taxi pipeline on portable-local's isolated SDK workers (root on S3), and a
runner configuration that cannot work refused, with what to pass, before anything runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile

import pytest

from beam_pipeline import launcher, remote_fs
from beam_pipeline.errors import BeamPipelineError
from examples.chicago_taxi.pipeline import create_pipeline
from runners.options import runner_args
from runners.preflight import RunnerConfigError
from tests.conftest import ROOT


@pytest.mark.slow
def test_the_whole_taxi_pipeline_runs_on_the_portable_runner(s3_server, taxi_small_csv, tmp_path):
    """User-module functions travel by value: a worker cannot import the driver's module names, nor
    read its disk, so data, root and serving dir are on S3; only ML Metadata is the driver's."""
    import tensorflow as tf

    from runners.options import local_portable_services

    bucket = s3_server.new_bucket()
    s3_server.client().upload_file(taxi_small_csv, bucket[5:], "data/data.csv")
    pipeline = create_pipeline(
        pipeline_root=f"{bucket}/root",
        data_path=f"{bucket}/data/data.csv",
        train_steps=20,
        serving_model_dir=f"{bucket}/serving",
    )
    with local_portable_services() as args:
        args += remote_fs.enable_for([bucket], args)
        result = launcher.run(pipeline, args, metadata_uri=str(tmp_path / "metadata.sqlite"))
    assert {c.id: c.state for c in result.components.values()} == dict.fromkeys(
        [c.id for c in pipeline.ordered], "COMPLETE"
    )
    model = result.artifact("Trainer", "model")
    assert tf.io.gfile.exists(f"{model.uri}/Format-Serving/saved_model.pb")
    rows = result.artifact("ExampleGen", "examples").properties["row_counts"]
    assert sum(rows.values()) == 1500
    evaluation = result.artifact("Evaluator", "evaluation")
    assert evaluation.uri.startswith(f"{bucket}/") and tf.io.gfile.listdir(evaluation.uri)


# -- bad runner configuration ---------------------------------------------------------------------
@pytest.fixture
def closed_port():
    """A loopback port bound by this test and not listening: a connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def open_port():
    """A loopback port something listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def jar(tmp_path) -> str:
    path = tmp_path / "job-server.jar"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    return str(path)


def _refused(runner: str, *args: str) -> str:
    with pytest.raises(RunnerConfigError) as raised, runner_args(runner, list(args)):
        pytest.fail("runner_args yielded arguments for a runner that cannot run")
    assert isinstance(raised.value, BeamPipelineError)  # the CLI prints these as `error: ...`
    return str(raised.value)


def test_portable_needs_a_job_endpoint():
    assert "pass --job_endpoint=HOST:PORT" in _refused("portable")


def test_portable_with_an_unreachable_job_endpoint(closed_port):
    message = _refused("portable", f"--job_endpoint=localhost:{closed_port}")
    assert f"--job_endpoint=localhost:{closed_port}: nothing accepts connections" in message
    assert "Connection refused" in message


def test_flink_with_a_missing_job_server_jar(tmp_path):
    message = _refused("flink", f"--flink_job_server_jar={tmp_path}/missing.jar")
    assert f"--flink_job_server_jar={tmp_path}/missing.jar: no such file" in message
    assert "beam-runners-flink-1.20-job-server-" in message and "--job_endpoint=HOST:PORT" in message


def test_flink_with_a_job_server_jar_that_is_no_jar(tmp_path):
    (tmp_path / "notes.jar").write_text("not a zip")
    assert "not a jar (zip) file" in _refused("flink", f"--flink_job_server_jar={tmp_path}/notes.jar")


def test_flink_with_an_unreachable_master(closed_port, jar):
    message = _refused("flink", f"--flink_master=localhost:{closed_port}", f"--flink_job_server_jar={jar}")
    assert f"--flink_master=localhost:{closed_port}: nothing accepts connections" in message
    assert "--flink_master=[local]" in message and message.count("\n  - ") == 1  # the jar is fine


def test_every_flink_problem_is_reported_at_once(closed_port, tmp_path):
    message = _refused("FlinkRunner", f"--flink_master=http://localhost:{closed_port}", "--flink_job_server_jar=x.jar")
    assert "--flink_master=" in message and "--flink_job_server_jar=x.jar: no such file" in message


def test_flink_with_a_reachable_master_and_beams_jar_in_its_cache(open_port, tmp_path):
    from apache_beam.utils.subprocess_server import JavaJarServer

    default = JavaJarServer.path_to_beam_jar(":runners:flink:1.20:job-server:shadowJar")
    with zipfile.ZipFile(tmp_path / os.path.basename(default), "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    # An uber jar is built in Python and uploaded to the master: no Java job server, so no `java` needed.
    args = [f"--flink_master=localhost:{open_port}", f"--jar_cache_dir={tmp_path}", "--flink_submit_uber_jar"]
    with runner_args("flink", args) as beam_args:
        assert beam_args == ["--runner=FlinkRunner", *args]


def test_flink_or_spark_with_a_job_endpoint_checks_only_that(closed_port, open_port):
    with runner_args("spark", [f"--job_endpoint=localhost:{open_port}", "--spark_job_server_jar=/absent.jar"]):
        pass
    assert "nothing accepts connections" in _refused("flink", f"--job_endpoint=localhost:{closed_port}")


def test_spark_with_an_unreachable_master(closed_port, jar):
    message = _refused("spark", f"--spark_master_url=spark://localhost:{closed_port}", f"--spark_job_server_jar={jar}")
    assert f"--spark_master_url=spark://localhost:{closed_port}: nothing accepts connections" in message
    assert "--spark_master_url=local[N]" in message


def test_spark_with_a_missing_job_server_jar(tmp_path):
    message = _refused("spark", f"--spark_job_server_jar={tmp_path}/missing.jar")  # master local[4]: no check
    assert f"--spark_job_server_jar={tmp_path}/missing.jar: no such file" in message
    assert "beam-runners-spark-3-job-server-" in message


def test_a_worker_count_must_be_a_count(open_port):
    message = _refused("portable", f"--job_endpoint=localhost:{open_port}", "--sdk_worker_parallelism=two")
    assert "--sdk_worker_parallelism=two: expected a whole number" in message


def test_other_runners_pass_through_unchecked():
    for runner, expected in ((None, []), ("direct", ["--runner=FnApiRunner"]), ("MyRunner", ["--runner=MyRunner"])):
        with runner_args(runner) as beam_args:
            assert beam_args == expected


def test_the_cli_prints_the_error_and_runs_nothing(closed_port, tmp_path):
    root = tmp_path / "root"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "beam_pipeline",
            "run",
            os.path.join(ROOT, "examples", "chicago_taxi", "pipeline.py"),
            "--pipeline-root",
            str(root),
            "--runner",
            "portable",
            f"--job_endpoint=localhost:{closed_port}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: --runner=PortableRunner cannot run as configured:\n  - --job_endpoint=localhost:{closed_port}" in (
        done.stderr
    )
    assert not root.exists()  # no store, no execution, no output
