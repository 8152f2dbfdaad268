"""Clusters of training processes for MultiWorkerMirroredStrategy: rendezvous, TF_CONFIG, supervision.

Every training task runs in its own freshly spawned interpreter, since collective ops can only be
configured before TensorFlow starts. On a distributed runner the N tasks are N Beam elements on N
SDK workers; they find each other through a rendezvous directory on the pipeline root's filesystem
(local, s3://, gs://): each writes `task-<i>.json` with `host:port` (a port free on its host) and
waits until all N have. A task that fails writes `failed-<i>.txt` there, so its peers stop at once
instead of waiting on collective ops. On an in-process runner, which runs one bundle at a time, one
element starts all N processes on loopback ports and watches them itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import pickle
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.errors import TrainingClusterError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
POLL_S = 0.5
# Where a worker's address can be overridden when its hostname does not resolve to what peers reach.
HOST_ENV = "BEAM_PIPELINE_TRAINING_HOST"
_ENTRY = re.compile(r"^(task|failed)-(\d+)\.(json|txt)$")


def host_address() -> str:
    """The address peers reach this host at: $BEAM_PIPELINE_TRAINING_HOST, else what the hostname resolves to."""
    override = os.environ.get(HOST_ENV)
    if override:
        return override
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:  # a hostname without a DNS entry: only processes on this host can join
        return "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on now; the training process binds it a moment later."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def tf_config(addresses: Sequence[str], index: int) -> str:
    """TF_CONFIG for task `index` of a cluster of workers at `addresses` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}})


def runs_bundles_one_at_a_time(runner: Any) -> bool:
    """Whether `runner` is an in-process one (FnApiRunner, DirectRunner), whose bundles run one by one."""
    from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner, DirectRunner
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return isinstance(runner, FnApiRunner | DirectRunner | BundleBasedDirectRunner)


def parallelism_hint(num_workers: int) -> str:
    return (
        f"the runner must run {num_workers} bundles at once — parallelism >= {num_workers} "
        f"(portable-local: --sdk_worker_parallelism={num_workers}; Flink: --parallelism={num_workers}; "
        f"Spark: --spark_master_url=local[{num_workers}] or {num_workers} executor cores; "
        f"Dataflow: --num_workers={num_workers})"
    )


class Rendezvous:
    """The meeting point of one Trainer's N training tasks in one run, a directory on any filesystem."""

    def __init__(self, uri: str, num_workers: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: expected >= 1")
        self.uri = uri.rstrip("/")
        self.num_workers = num_workers
        self.timeout_s = timeout_s

    def _path(self, name: str) -> str:
        return FileSystems.join(self.uri, name)

    def _entries(self) -> dict[str, dict[int, str]]:
        """{"task": {index: path}, "failed": {index: path}} of what is in the directory now."""
        found: dict[str, dict[int, str]] = {"task": {}, "failed": {}}
        for match in FileSystems.match([self._path("*")])[0].metadata_list:
            m = _ENTRY.match(match.path.rsplit("/", 1)[-1])
            if m:
                found[m.group(1)][int(m.group(2))] = match.path
        return found

    def _write(self, name: str, text: str) -> None:
        # Written under another name first: peers list the directory and must never read half a file.
        temp = self._path(f".{name}.{os.getpid()}.tmp")
        with FileSystems.create(temp) as f:
            f.write(text.encode())
        FileSystems.rename([temp], [self._path(name)])

    @staticmethod
    def _read(path: str) -> str:
        with FileSystems.open(path) as f:
            return f.read().decode()

    def failure(self, entries: dict[str, dict[int, str]] | None = None) -> str | None:
        """The message of the first task that failed, or None while none has."""
        failed = (entries or self._entries())["failed"]
        return self._read(failed[min(failed)]) if failed else None

    def fail(self, index: int, message: str) -> None:
        """Tell the peers that task `index` failed (they stop instead of waiting on it)."""
        self._write(f"failed-{index}.txt", f"training task {index} failed: {message}")

    def join(self, index: int, address: str) -> list[str]:
        """Register task `index` at `address` and wait for all N; returns the addresses by task index."""
        if not 0 <= index < self.num_workers:
            raise ValueError(f"task index {index} is outside 0..{self.num_workers - 1}")
        entries = self._entries()
        if index in entries["task"]:
            # A runner retrying a lost task: the peers' collectives cannot take it back mid-training.
            message = (
                f"training task {index} started a second time in this run (a retry after a lost worker): "
                "a MultiWorkerMirroredStrategy cluster cannot take a worker back, rerun the pipeline"
            )
            self.fail(index, message)
            raise TrainingClusterError(message)
        self._write(f"task-{index}.json", json.dumps({"address": address, "pid": os.getpid()}))
        deadline = time.monotonic() + self.timeout_s
        while True:
            entries = self._entries()
            failure = self.failure(entries)
            if failure:
                raise TrainingClusterError(failure)
            if len(entries["task"]) == self.num_workers:
                return [json.loads(self._read(entries["task"][i]))["address"] for i in range(self.num_workers)]
            if time.monotonic() >= deadline:
                message = (
                    f"only {len(entries['task'])} of {self.num_workers} training workers started within "
                    f"{self.timeout_s:g} s: {parallelism_hint(self.num_workers)}"
                )
                self.fail(index, message)
                raise TrainingClusterError(message)
            time.sleep(POLL_S)

    def remove(self) -> None:
        if FileSystems.match([self._path("*")])[0].metadata_list:
            FileSystems.delete([self.uri])


def _die_with_parent(parent_pid: int) -> None:
    """A training process outlives nothing: when its parent (an SDK worker, which a runner may kill
    outright) dies, the kernel kills it too instead of leaving it training for nobody."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


PR_SET_PDEATHSIG = 1


def _task_main(
    conn: Any, env: dict[str, str], paths: Sequence[str], fn: Callable[..., Any], args: tuple, parent_pid: int
) -> None:
    """Body of a training process: set the environment before TensorFlow starts, run fn, send the outcome."""
    _die_with_parent(parent_pid)
    os.environ.update(env)
    from runners import training

    try:
        training.reach(paths)
        outcome = (True, fn(*args))
    except BaseException as e:  # every outcome goes back to the parent, which re-raises it
        outcome = (False, e)
        try:
            pickle.loads(pickle.dumps(e))
        except (pickle.PickleError, TypeError, AttributeError):  # TF errors need arguments pickle drops
            outcome = (False, TrainingClusterError(f"{type(e).__name__}: {e}"))
    conn.send(outcome)
    conn.close()


class TrainingProcess:
    """fn(*args) in a newly spawned interpreter with `env` set; `paths` are made reachable there first."""

    def __init__(self, name: str, fn: Callable[..., Any], args: tuple, env: dict[str, str], paths: Sequence[str]):
        context = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = context.Pipe(duplex=False)
        # The kernel's parent-death signal follows the creating thread, which waits here for the process.
        task = (child, env, list(paths), fn, args, os.getpid())
        self._process = context.Process(target=_task_main, args=task, daemon=True)
        self._process.start()
        child.close()
        self._outcome: tuple[bool, Any] | None = None

    @property
    def failed(self) -> bool:
        return self.poll() and not self._outcome[0]

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def poll(self, timeout_s: float = 0) -> bool:
        """Whether the process has finished; its outcome is then kept."""
        if self._outcome is None and self._conn.poll(timeout_s):
            try:
                self._outcome = self._conn.recv()
            except EOFError:
                self._process.join()
                self._outcome = (
                    False,
                    TrainingClusterError(f"{self.name} (pid {self.pid}) died with exit code {self._process.exitcode}"),
                )
        if self._outcome is not None:
            self._process.join()
        return self._outcome is not None

    def result(self) -> Any:
        if not self.poll():
            raise RuntimeError(f"{self.name} is still running")
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._conn.close()


def supervise(
    processes: Sequence[TrainingProcess], watch: Callable[[], str | None] | None = None, poll_s: float = POLL_S
) -> list[Any]:
    """Wait for every process; their results in order. The first failure (of a process, or a message
    from `watch`) kills the others and is raised."""
    try:
        while True:
            for process in processes:
                if process.failed:
                    process.result()  # raises its error
            if all(process.poll() for process in processes):
                return [process.result() for process in processes]
            message = watch() if watch else None
            if message:
                raise TrainingClusterError(message)
            processes[0].poll(poll_s)
    finally:
        for process in processes:
            process.kill()


def run_local_cluster(
    make_args: Callable[[int], tuple], fn: Callable[..., Any], num_workers: int, paths: Sequence[str]
) -> list[Any]:
    """fn(*make_args(i)) in N processes of one cluster on loopback ports; the results by task index."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(num_workers)]
    log.info("in-process runner: the %d training workers run as local processes at %s", num_workers, addresses)
    processes: list[TrainingProcess] = []
    try:
        for i in range(num_workers):
            env = {"TF_CONFIG": tf_config(addresses, i)}
            processes.append(TrainingProcess(f"training worker {i}", fn, make_args(i), env, paths))
    except BaseException:
        for process in processes:
            process.kill()
        raise
    return supervise(processes)


def run_cluster_task(
    rendezvous: Rendezvous, index: int, fn: Callable[..., Any], args: tuple, paths: Sequence[str]
) -> Any:
    """Task `index` of a cluster whose tasks meet at `rendezvous`: join, train, and tell the peers if it fails."""
    address = f"{host_address()}:{free_port()}"
    addresses = rendezvous.join(index, address)
    log.info("training task %d of %d at %s; cluster %s", index, rendezvous.num_workers, address, addresses)
    env = {"TF_CONFIG": tf_config(addresses, index)}
    try:
        process = TrainingProcess(f"training task {index}", fn, args, env, paths)
        return supervise([process], watch=rendezvous.failure)[0]
    except TrainingClusterError as e:
        if rendezvous.failure() is None:
            rendezvous.fail(index, str(e))
        raise
    except BaseException as e:
        rendezvous.fail(index, f"{type(e).__name__}: {e}")
        raise
