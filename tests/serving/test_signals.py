"""`beam-pipeline serve` stops on SIGINT and SIGTERM even when it inherited SIGINT ignored, workers included."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.serving.serve_process import catches, group_alive, serve_process, spawned_children, stop, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("sig", "workers"),
    [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2), (signal.SIGTERM, 2)],
    ids=["SIGINT", "SIGTERM", "SIGINT-2-workers", "SIGTERM-2-workers"],
)
def test_serving_server_stops_on_signal_although_sigint_was_ignored(base_path, tmp_path, sig, workers):
    log_path = tmp_path / "server.log"
    flags = ["--poll_interval_s", "0", "--workers", str(workers)]
    with serve_process(base_path, log_path, *flags, ignore_sigint=True) as (proc, url):
        wait_for(lambda: httpx.get(url, timeout=30).status_code == 200, "the server is up", proc)
        workers_pids: list[int] = []
        if workers > 1:
            wait_for(lambda: len(spawned_children(proc.pid)) == workers, f"{workers} worker processes run", proc)
            workers_pids = spawned_children(proc.pid)
        returncode = stop(proc, sig, log_path)
        log = log_path.read_text()
        assert returncode == 0, log
        # Nothing of the server is left: its process group (workers, resource tracker) is empty.
        wait_for(lambda: not group_alive(proc.pid), "every process of the server's group has exited")
        for pid in workers_pids:
            assert f"Finished server process [{pid}]" in log, log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_startup_stops_the_server(base_path, tmp_path, sig):
    log_path = tmp_path / "server.log"
    with serve_process(base_path, log_path, "--poll_interval_s", "0", ignore_sigint=True, wait_for_port=False) as (
        proc,
        _url,
    ):
        # Once the command has installed its handlers (before TensorFlow is even imported) a signal counts.
        wait_for(lambda: catches(proc.pid, signal.SIGINT), "serve handles SIGINT", proc)
        returncode = stop(proc, sig, log_path)
        assert returncode == 0, log_path.read_text()
