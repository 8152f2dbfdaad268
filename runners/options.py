"""Runner presets: the same pipeline file on DirectRunner, a portable job service, Dataflow, Flink or Spark.

Each preset only chooses Beam's own runner and options; nothing here executes a graph itself.
`portable-local` starts Beam's local job service and an SDK worker pool as separate processes on
loopback, so the job goes through the Fn API exactly as on Flink, Spark or Dataflow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from beam_pipeline.ports import free_port

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

PRESETS: dict[str, list[str]] = {
    # Beam's in-process FnApiRunner: what DirectRunner runs batch pipelines on, without DirectRunner's
    # first attempt to download and start the Prism binary (see in_process_runner).
    "direct": ["--runner=FnApiRunner"],
    # The caller names the job service: --job_endpoint=host:port (and an --environment_type).
    "portable": ["--runner=PortableRunner"],
    # Add --project, --region, --temp_location (gs://...) and --setup_file ./setup.py.
    "dataflow": ["--runner=DataflowRunner"],
    # Add --flink_master=host:8081 (Beam starts the Flink job server for you).
    "flink": ["--runner=FlinkRunner"],
    # Add --spark_master_url=spark://host:7077.
    "spark": ["--runner=SparkRunner"],
}


def in_process_runner(options: PipelineOptions) -> FnApiRunner:
    """Beam's FnApiRunner, set up as DirectRunner sets it up when it falls back to it.

    Since Beam 2.6x, DirectRunner first tries Prism, a Go runner it downloads from GitHub on first use:
    offline that costs a failed download on every run, online it silently changes the runner. The
    embedded default is this in-process runner, every time. `--runner=DirectRunner` still gets Beam's.
    """
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(provision))


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s")


@contextlib.contextmanager
def local_portable_services() -> Iterator[list[str]]:
    """Start Beam's local job service and an SDK worker pool (separate processes); yield runner args."""
    job_port, pool_port = free_port(), free_port()
    # The worker pool starts SDK harnesses as plain `python`: make that this interpreter (e.g. the venv's).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", PATH=path)
    procs = []
    try:
        pool = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(pool)
        job = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(job)
        _wait_for_port(pool_port, pool, "SDK worker pool")
        _wait_for_port(job_port, job, "local job service")
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
        ]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def runner_args(runner: str | None, extra: Sequence[str] = ()) -> Iterator[list[str]]:
    """Beam arguments for a preset name (or a runner class name passed through), plus `extra`."""
    extra = list(extra)
    if runner == "portable-local":
        with local_portable_services() as args:
            yield args + extra
        return
    if runner is None:
        yield extra
    elif runner.lower() in PRESETS:
        yield PRESETS[runner.lower()] + extra
    else:
        yield [f"--runner={runner}", *extra]
