"""Runner presets: the same pipeline file on DirectRunner, a portable job service, Dataflow, Flink or Spark.

Each preset only chooses Beam's own runner and options; nothing here executes a graph itself.
`portable-local` starts Beam's job service and an SDK worker pool in another process on loopback
(runners/local_services.py), so the job goes through the Fn API as on Flink, Spark or Dataflow: by
default on 2 SDK worker processes (`--sdk_worker_parallelism=N` changes it) that share no disk with
the driver (runners/isolation.py; BEAM_PIPELINE_ISOLATE_WORKERS=0 turns that off), so its pipeline
root and inputs must be on a filesystem every worker sees (s3://, gs://). Before anything runs,
`runner_args` checks that the runner the arguments select can work (runners/preflight.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from runners import isolation, preflight

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

log = logging.getLogger(__name__)

# Added to the Beam args when the SDK workers cannot see this machine's disk (isolated portable-local):
# the launcher then refuses local paths they would have to read.
NO_SHARED_DISK = "beam_pipeline_workers_share_no_disk"

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


DEFAULT_WORKERS = 2
SERVICES_START_TIMEOUT_S = 180


@contextlib.contextmanager
def local_portable_services(*, workers: int = DEFAULT_WORKERS, isolate: bool | None = None) -> Iterator[list[str]]:
    """Start Beam's job service and an SDK worker pool in another process; yield the runner args for them.

    `workers` SDK worker processes per job; `isolate` (default: BEAM_PIPELINE_ISOLATE_WORKERS, on)
    starts them where the driver's disk is out of sight (runners/isolation.py).
    """
    if workers < 0:
        raise preflight.RunnerConfigError(f"workers={workers}: expected 0 (one per CPU) or more")
    isolated = isolation.decide(isolate)
    command = [sys.executable, "-m", "runners.local_services"]
    # SDK workers are `sys.executable`; subprocesses user code starts as `python` should be this one too.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path)
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    cwd = None
    if isolated is not None:
        command = isolated.command([*command, "--isolate-workers", shlex.join(isolated.unshare)], "beam-services")
        env["TMPDIR"] = "/tmp"  # the private one; the driver's TMPDIR may be elsewhere
    else:
        cwd = tempfile.mkdtemp(prefix="beam-services-")
    with tempfile.NamedTemporaryFile(prefix="beam-portable-local-", suffix=".log", delete=False) as log_file:
        log_path = log_file.name
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=cwd
        )
    failed = True
    try:
        ports = _read_ports(proc, log_path)
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{ports['job_port']}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{ports['pool_port']}",
            f"--sdk_worker_parallelism={workers}",
            *([f"--experiments={NO_SHARED_DISK}"] if isolated is not None else []),
        ]
        failed = False
    finally:
        _stop(proc)
        if failed or proc.returncode != 0:
            log.warning("portable-local: the job service's log is kept at %s", log_path)
        else:
            os.unlink(log_path)


def _read_ports(proc: subprocess.Popen, log_path: str) -> dict[str, int]:
    """The ports the services bound (port 0, so no other process can take them between pick and bind)."""
    deadline = time.monotonic() + SERVICES_START_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline().decode(errors="replace")
            try:
                ports = json.loads(line)
                return {"job_port": int(ports["job_port"]), "pool_port": int(ports["pool_port"])}
            except (ValueError, KeyError, TypeError):
                proc.wait(10)
                raise preflight.RunnerConfigError(
                    f"portable-local: the job service printed {line!r} instead of its ports{_log_tail(log_path)}"
                ) from None
        if proc.poll() is not None:
            break
    if proc.poll() is None:
        raise preflight.RunnerConfigError(
            f"portable-local: the job service did not start within {SERVICES_START_TIMEOUT_S} s{_log_tail(log_path)}"
        )
    raise preflight.RunnerConfigError(
        f"portable-local: the job service exited with code {proc.returncode} before serving{_log_tail(log_path)}"
    )


def _log_tail(log_path: str, lines: int = 30) -> str:
    with open(log_path, errors="replace") as f:
        tail = f.readlines()[-lines:]
    return f"; its log ({log_path}) ends:\n" + "".join(tail) if tail else f" (log: {log_path}, empty)"


def _stop(proc: subprocess.Popen) -> None:
    """Close the services' stdin (they stop their workers and exit); kill them if they do not."""
    if proc.stdin and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except BrokenPipeError:  # already gone
            pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def runner_args(runner: str | None, extra: Sequence[str] = ()) -> Iterator[list[str]]:
    """Beam arguments for a preset name (or a runner class name passed through), plus `extra`.

    Raises a RunnerConfigError before anything runs when the selected runner cannot work as configured.
    """
    extra = list(extra)
    if runner == "portable-local":
        with local_portable_services() as args:
            preflight.check(args + extra)
            yield args + extra
        return
    if runner is None:
        args = extra
    elif runner.lower() in PRESETS:
        args = PRESETS[runner.lower()] + extra
    else:
        args = [f"--runner={runner}", *extra]
    preflight.check(args)
    yield args
