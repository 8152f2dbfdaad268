"""The `portable-local` cluster in one process: Beam's job service driving N SDK workers from a worker pool.

Run as `python -m runners.local_services [--isolate-workers PREFIX]`. Both gRPC servers bind port 0
on loopback; the ports they got are printed as one JSON line on stdout (`{"job_port": ..,
"pool_port": ..}`), and the process serves until its stdin closes (the driver exits or dies).

Beam's local job service runs each job on an FnApiRunner with one SDK worker: it calls
`run_via_runner_api`, which skips where `run_pipeline` reads `--direct_num_workers`. Here a job runs
on `--sdk_worker_parallelism` workers (0: one per CPU), Beam's option for "SDK worker processes per
node"; the runner then hands each parallel bundle of a stage to the next worker.

Workers come from an EXTERNAL-environment worker pool. Unlike Beam's `worker_pool_main`, which starts
a bare `SdkHarness` that never sees the pipeline options, this pool asks the job's provision service
for them and starts Beam's `sdk_worker_main` as Beam's container boot does, so `--beam_plugins`
(e.g. the S3 filesystem plugin) and filesystem options reach the worker. Each worker is its own
process with its own working directory; with `--isolate-workers` also its own mount namespace and
private /tmp (runners/isolation.py). Staged artifacts (--setup_file, --requirements_file) are not
installed: local workers run in the driver's interpreter and packages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import grpc
from apache_beam.options.pipeline_options import PortableOptions
from apache_beam.portability.api import (
    beam_fn_api_pb2,
    beam_fn_api_pb2_grpc,
    beam_provision_api_pb2,
    beam_provision_api_pb2_grpc,
)
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.worker import worker_pool_main
from apache_beam.utils import thread_pool_executor
from google.protobuf import json_format, text_format

from runners.isolation import Isolation, for_workers

log = logging.getLogger(__name__)
PROVISION_TIMEOUT_S = 60


def worker_count(options) -> int:
    """SDK workers for one job: `--sdk_worker_parallelism`, 0 meaning one per CPU."""
    value = options.view_as(PortableOptions).sdk_worker_parallelism
    count = int(float(value))  # a number in the job's options Struct arrives as a float
    return count if count > 0 else os.cpu_count() or 1


class ParallelJob(local_job_service.BeamJob):
    """A job of Beam's local job service that runs on `worker_count` SDK workers instead of one."""

    def _invoke_runner(self):
        from apache_beam.portability.api import beam_job_api_pb2

        self.set_state(beam_job_api_pb2.JobState.RUNNING)
        options = self.pipeline_options()
        runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
        # What FnApiRunner.run_pipeline sets from --direct_num_workers; run_via_runner_api never does.
        runner._num_workers = worker_count(options)
        return runner.run_via_runner_api(self._pipeline_proto, options)


class WorkerPool(worker_pool_main.BeamFnExternalWorkerPoolServicer):
    """Starts each requested SDK worker as `sdk_worker_main` in its own process, with the job's options."""

    def __init__(self, isolation: Isolation | None) -> None:
        super().__init__(use_process=True)
        self._isolation = isolation

    def StartWorker(self, request: beam_fn_api_pb2.StartWorkerRequest, context) -> beam_fn_api_pb2.StartWorkerResponse:
        try:
            info = _provision(request.provision_endpoint.url, request.worker_id)
        except grpc.RpcError as e:
            return beam_fn_api_pb2.StartWorkerResponse(
                error=f"worker {request.worker_id}: the provision service at {request.provision_endpoint.url} "
                f"did not answer: {e}"
            )
        env = dict(
            os.environ,
            WORKER_ID=request.worker_id,
            PIPELINE_OPTIONS=json_format.MessageToJson(info.pipeline_options),
            CONTROL_API_SERVICE_DESCRIPTOR=text_format.MessageToString(request.control_endpoint),
            LOGGING_API_SERVICE_DESCRIPTOR=text_format.MessageToString(request.logging_endpoint),
            RUNNER_CAPABILITIES=" ".join(info.runner_capabilities),
        )
        command = [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"]
        workdir = f"sdk-worker-{request.worker_id}"
        cwd = None
        if self._isolation is not None:
            command = self._isolation.command(command, workdir)
        else:
            cwd = tempfile.mkdtemp(prefix=workdir + "-")
        try:
            # A worker's stdout goes to our stderr (the driver's log file): an unread pipe would fill and block it.
            proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=sys.stderr.fileno(), close_fds=True)
        except OSError as e:
            return beam_fn_api_pb2.StartWorkerResponse(error=f"worker {request.worker_id}: cannot start {command}: {e}")
        log.info("started SDK worker %s (pid %d)", request.worker_id, proc.pid)
        self._worker_processes[request.worker_id] = proc
        return beam_fn_api_pb2.StartWorkerResponse()

    def stop_all(self) -> None:
        for worker_id in list(self._worker_processes):
            worker_pool_main.kill_process_gracefully(self._worker_processes.pop(worker_id))


def _provision(endpoint: str, worker_id: str) -> beam_provision_api_pb2.ProvisionInfo:
    """The job's provision info for one worker (pipeline options, runner capabilities), as Beam's boot asks."""
    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        response = stub.GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(),
            metadata=[("worker_id", worker_id)],
            timeout=PROVISION_TIMEOUT_S,
        )
    return response.info


def start_pool(isolation: Isolation | None) -> tuple[WorkerPool, grpc.Server, int]:
    """The worker pool's gRPC server on a loopback port the OS picks (Beam's binds every interface)."""
    pool = WorkerPool(isolation)
    server = grpc.server(
        thread_pool_executor.shared_unbounded_instance(),
        options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)],
    )
    port = server.add_insecure_port("localhost:0")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    server.start()
    return pool, server, port


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--isolate-workers",
        metavar="PREFIX",
        default=None,
        help="the unshare command prefix (one shell-quoted string) that starts each worker in its own namespace",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    isolation = for_workers(shlex.split(args.isolate_workers)) if args.isolate_workers else None

    jobs = local_job_service.LocalJobServicer(beam_job_type=ParallelJob)
    job_port = jobs.start_grpc_server(0)
    pool, pool_server, pool_port = start_pool(isolation)
    print(json.dumps({"job_port": job_port, "pool_port": pool_port}), flush=True)
    try:
        sys.stdin.read()  # serve until the driver closes our stdin, or dies
    finally:
        pool_server.stop(0)
        pool.stop_all()
        jobs.stop()


if __name__ == "__main__":
    main()
