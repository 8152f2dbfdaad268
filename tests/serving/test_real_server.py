"""The server over real HTTP: the `beam-pipeline serve` command, and uvicorn under concurrent clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
import uvicorn

from beam_pipeline.serving.server import create_app
from beam_pipeline.serving.testing import expected_score
from tests.serving.conftest import ROW, V1_BIAS, V2_BIAS
from tests.serving.serve_process import ROOT, serve_process, spawned_children, stop, wait_for

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _serve_command(base_path: str, log_path, *flags: str):
    """`beam-pipeline serve` in a subprocess on a free port; yields (process, model URL); it must exit 0 on SIGINT.

    Its process group is killed on the way out whatever happened, so a failing test leaves nothing running.
    """
    with serve_process(base_path, log_path, *flags) as (proc, url):
        yield proc, url
        returncode = stop(proc, signal.SIGINT, log_path)
        with open(log_path) as log:
            assert returncode == 0, log.read()


def _state(response: httpx.Response) -> str | None:
    if response.status_code != 200:
        return None
    return response.json()["model_version_status"][0]["state"]


def test_serve_command(base_path, push, tmp_path):
    flags = ["--poll_interval_s", "0.2", "--model_version_labels", "stable=1"]
    with _serve_command(base_path, tmp_path / "server.log", *flags) as (proc, url), httpx.Client(timeout=30) as client:
        wait_for(lambda: client.get(url).status_code == 200, "the server is up", proc)
        r = client.post(f"{url}:predict", json={"instances": [ROW]})
        assert r.json()["predictions"][0][0] == pytest.approx(expected_score(2.0, "Cash", V1_BIAS), rel=1e-6)

        push(base_path, 2)
        # The status lists version 2 while it loads (LOADING), as TF Serving does: wait for AVAILABLE.
        wait_for(lambda: _state(client.get(f"{url}/versions/2")) == "AVAILABLE", "version 2 is loaded", proc)
        r = client.post(f"{url}:predict", json={"instances": [ROW]})
        assert r.json()["predictions"][0][0] == pytest.approx(expected_score(2.0, "Cash", V2_BIAS), rel=1e-6)
        r = client.post(f"{url}/labels/stable:predict", json={"instances": [ROW]})
        assert r.json()["predictions"][0][0] == pytest.approx(expected_score(2.0, "Cash", V1_BIAS), rel=1e-6)


def test_serve_command_with_two_worker_processes(base_path, push, tmp_path):
    flags = ["--poll_interval_s", "0.2", "--workers", "2"]
    with _serve_command(base_path, tmp_path / "server.log", *flags) as (proc, url):

        def scores() -> list[float]:
            # A new connection per request, so the kernel spreads them over both processes.
            return [
                httpx.post(f"{url}:predict", json={"instances": [ROW]}, timeout=30).json()["predictions"][0][0]
                for _ in range(20)
            ]

        wait_for(lambda: httpx.get(url, timeout=30).status_code == 200, "the server is up", proc)
        wait_for(lambda: len(spawned_children(proc.pid)) == 2, "two worker processes run", proc)
        v1, v2 = expected_score(2.0, "Cash", V1_BIAS), expected_score(2.0, "Cash", V2_BIAS)
        assert scores() == pytest.approx([v1] * 20, rel=1e-6)
        push(base_path, 2)
        # Each process polls the base path on its own: wait until every answer comes from version 2.
        wait_for(lambda: scores() == pytest.approx([v2] * 20, rel=1e-6), "both processes serve version 2", proc)


def test_bad_flags_are_usage_errors(tmp_path):
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "beam_pipeline", "serve", "--model_base_path", str(tmp_path)]
    for extra, word in (
        (["--model_version_labels", "stable"], "LABEL=VERSION"),
        (["--model_name", "../x"], "model name"),
    ):
        r = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 2 and word in r.stderr, r.stderr


def test_concurrent_clients_each_get_their_own_rows(base_path):
    app = create_app(base_path, "taxi", poll_interval_s=0, max_batch_size=32)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # A daemon thread, so a server that does not stop cannot keep the test process alive either.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    rows = [
        {"trip_miles": float(i), "trip_seconds": i, "payment_type": "Cash" if i % 2 else "Card"} for i in range(200)
    ]

    async def drive() -> list[float]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client:

            async def one(row: dict) -> float:
                r = await client.post("/v1/models/taxi:predict", json={"instances": [row]})
                return r.json()["predictions"][0][0]

            return await asyncio.gather(*(one(row) for row in rows))

    try:
        wait_for(lambda: server.started, "uvicorn started")
        results = asyncio.run(drive())
    finally:
        server.should_exit = True
        thread.join(60)
        if thread.is_alive():
            server.force_exit = True
            thread.join(60)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"
    expected = [expected_score(r["trip_miles"], r["payment_type"], V1_BIAS) for r in rows]
    assert results == pytest.approx(expected, rel=1e-6)
