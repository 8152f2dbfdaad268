"""Start `beam-pipeline serve` in its own process group for a test, and never leave a process behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXIT_TIMEOUT_S = 60


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen | None = None) -> None:
    for _ in range(1200):  # a bound on a wait, not a timing assertion
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before {what}")
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def _ignore_sigint() -> None:
    # What a job started in the background of a non-interactive shell inherits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def group_alive(pgid: int) -> bool:
    """True while any process of the process group exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the server's whole process group (workers included) and reap the server."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(EXIT_TIMEOUT_S)


@contextlib.contextmanager
def serve_process(
    base_path: str, log_path: str | os.PathLike, *flags: str, ignore_sigint: bool = False, wait_for_port: bool = True
) -> Iterator[tuple[subprocess.Popen, str | None]]:
    """`beam-pipeline serve` on a port the OS picks, in a new session; yields (process, model URL).

    The server binds port 0 itself and the URL is read from its startup line, so no other process
    (another test suite on a busy machine) can take the port between choosing and binding it. With
    `wait_for_port=False` it yields at once, URL None (for tests that act during startup).
    Whatever happens in the body, the process group is SIGKILLed on the way out (a no-op if it exited).
    """
    cmd = [sys.executable, "-m", "beam_pipeline", "serve", "--model_base_path", base_path, "--model_name", "taxi"]
    cmd += ["--port", "0", *flags]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=_ignore_sigint if ignore_sigint else None,
        )
    try:
        url = None
        if wait_for_port:
            port = _bound_port(proc, log_path)
            url = f"http://127.0.0.1:{port}/v1/models/taxi"
        yield proc, url
    finally:
        kill_group(proc)


_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def _bound_port(proc: subprocess.Popen, log_path: str | os.PathLike) -> int:
    """The port uvicorn says it bound, read from the server's log once it says so."""
    found: list[int] = []

    def bound() -> bool:
        with open(log_path) as f:
            match = _RUNNING.search(f.read())
        if match:
            found.append(int(match.group(1)))
        return bool(found)

    wait_for(bound, "the server says which port it bound", proc)
    return found[0]


def stop(proc: subprocess.Popen, sig: int, log_path: str | os.PathLike) -> int:
    """Send `sig`, wait for the server to exit; fail (with its log) if it does not within the timeout."""
    proc.send_signal(sig)
    try:
        return proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with open(log_path) as f:
            raise AssertionError(
                f"serve did not exit within {EXIT_TIMEOUT_S} s of {signal.Signals(sig).name}:\n{f.read()}"
            ) from None


def spawned_children(pid: int) -> list[int]:
    """Worker processes multiprocessing spawned under `pid` (not its resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []
    workers = []
    for child in children:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                workers.append(child)
    return workers


def catches(pid: int, sig: int) -> bool:
    """True once process `pid` has a handler installed for `sig` (read from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False
