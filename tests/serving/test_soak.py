"""Soak: 64 concurrent clients against a real `serve` process for 60 s while versions 2 and 3 are pushed.

Every answer must be a 200 from exactly one whole version: the demo model's `bias` differs per version,
so each request's rows identify the version that answered them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal

import httpx
import pytest

from beam_pipeline.serving.testing import expected_score, write_demo_model
from tests.serving.serve_process import serve_process, stop, wait_for

pytestmark = pytest.mark.slow

BIASES = {1: 0.0, 2: 1.0, 3: 2.0}
CLIENTS = 64
DURATION_S = 60.0
MAX_REQUESTS_PER_CLIENT = 5000  # a bound on the loop besides its duration
# On a slow machine the clients go on (up to this much longer) until version 3 has answered.
GRACE_S = 120.0


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("soak_models")
    return {v: write_demo_model(str(root / str(v)), bias) for v, bias in BIASES.items()}


def push(base_path: str, source: str, version: int) -> None:
    """As the Pusher does: copy into a hidden temp dir, then rename it into place."""
    tmp = os.path.join(base_path, f".pushing-{version}")
    shutil.copytree(source, tmp)
    os.rename(tmp, os.path.join(base_path, str(version)))


def rows_for(client: int, i: int) -> list[dict]:
    return [
        {"trip_miles": float(client), "trip_seconds": 60, "payment_type": "Cash"},
        {"trip_miles": float(i % 50) / 2, "trip_seconds": 30, "payment_type": "Card"},
    ]


def answering_versions(rows: list[dict], predictions: list[list[float]]) -> list[int]:
    """The versions whose expected output equals the whole answer (all rows)."""
    got = [p[0] for p in predictions]
    return [
        v
        for v, bias in BIASES.items()
        if got == pytest.approx([expected_score(r["trip_miles"], r["payment_type"], bias) for r in rows], rel=1e-6)
    ]


def test_soak_pushes_under_load_answer_every_request_from_one_whole_version(tmp_path, versions):
    base_path = str(tmp_path / "taxi")
    os.makedirs(base_path)
    push(base_path, versions[1], 1)
    log_path = tmp_path / "server.log"
    with serve_process(base_path, log_path, "--poll_interval_s", "0.2") as (proc, url):
        wait_for(lambda: httpx.get(url, timeout=30).status_code == 200, "the server is up", proc)
        seen: collections.Counter[int] = collections.Counter()
        errors: list[str] = []
        done = [0]

        pushed = asyncio.Event()  # set once version 3 has answered (or the grace period is over)

        async def client_loop(client: httpx.AsyncClient, n: int, deadline: float) -> None:
            loop = asyncio.get_running_loop()
            for i in range(MAX_REQUESTS_PER_CLIENT):
                if loop.time() >= deadline + GRACE_S or (loop.time() >= deadline and pushed.is_set()):
                    return
                rows = rows_for(n, i)
                try:
                    r = await client.post(f"{url}:predict", json={"instances": rows})
                except httpx.HTTPError as e:
                    errors.append(f"client {n} request {i}: {type(e).__name__}: {e}")
                    continue
                done[0] += 1
                if r.status_code != 200:
                    errors.append(f"client {n} request {i}: HTTP {r.status_code}: {r.text[:200]}")
                    continue
                matched = answering_versions(rows, r.json()["predictions"])
                if len(matched) != 1:
                    errors.append(f"client {n} request {i}: {r.text[:200]} matches versions {matched}")
                    continue
                seen[matched[0]] += 1

        async def pusher(deadline: float) -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            try:
                for version in (2, 3):
                    # Push under load: after some answers, or a quarter of the run, whichever comes first.
                    due = start + (version - 1) * DURATION_S / 4
                    while done[0] < 500 * (version - 1) and loop.time() < due:
                        await asyncio.sleep(0.05)
                    await asyncio.to_thread(push, base_path, versions[version], version)
                    while not seen[version] and loop.time() < deadline + GRACE_S:
                        await asyncio.sleep(0.05)
            finally:
                pushed.set()

        async def main() -> None:
            deadline = asyncio.get_running_loop().time() + DURATION_S
            limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
            async with httpx.AsyncClient(limits=limits, timeout=60) as client:
                await asyncio.gather(pusher(deadline), *(client_loop(client, n, deadline) for n in range(CLIENTS)))

        asyncio.run(main())
        status = httpx.get(url, timeout=30).json()["model_version_status"]
        returncode = stop(proc, signal.SIGTERM, log_path)
    print(f"soak: {done[0]} requests answered, {len(errors)} errors, answers per version {dict(sorted(seen.items()))}")
    assert not errors, f"{len(errors)} errors, the first: {errors[:5]}"
    assert set(seen) == {1, 2, 3}, seen
    assert status[0]["version"] == "3" and status[0]["state"] == "AVAILABLE", status
    assert returncode == 0, log_path.read_text()
