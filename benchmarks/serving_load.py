"""Load test of `beam-pipeline serve`: throughput and latency with batching on and off, against a naive loop.

The server runs in a subprocess on a free loopback port and is driven by `wrk` (or, when wrk is not
installed, by an asyncio/httpx load generator) at each concurrency for a bounded time and request count.
The baseline is what a user would write without a server: a Python loop that parses each request's JSON,
calls the SavedModel signature directly and encodes the answer, one request at a time.

Usage:
    python benchmarks/serving_load.py [--model_base_path DIR] [--duration 10] [--concurrency 1 16 64]

Without --model_base_path the demo model of beam_pipeline.serving.testing is written to a temp dir.
Results are printed and written as the `## Serving` section of benchmarks/RESULTS.md (only that section).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from beam_pipeline.ports import free_port  # noqa: E402
from beam_pipeline.serving.models import load_servable  # noqa: E402
from beam_pipeline.serving.testing import write_demo_model  # noqa: E402
from benchmarks.results import PATH as RESULTS_MD  # noqa: E402
from benchmarks.results import write_section  # noqa: E402

SECTION = "Serving"
TARGET_P50_MS = 5.0
TARGET_SPEEDUP = 10.0


@dataclasses.dataclass
class Result:
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def _latest_version_dir(base_path: str) -> str:
    versions = [
        int(d)
        for d in os.listdir(base_path)
        if d.isdigit() and os.path.isfile(os.path.join(base_path, d, "saved_model.pb"))
    ]
    if not versions:
        raise SystemExit(f"no <version>/saved_model.pb under {base_path}")
    return os.path.join(base_path, str(max(versions)))


def request_body(version_dir: str) -> bytes:
    """One row-format predict request with a plausible value for each input of `serving_default`."""
    servable = load_servable("bench", 0, version_dir)
    sample = {"float": 1.5, "int": 3, "string": "Cash", "bool": True}
    row = {}
    for name, info in servable.signature("serving_default").inputs.items():
        if info.kind not in sample or info.shape is None or len(info.shape) != 1:
            raise SystemExit(f"input {name!r} ({info.dtype.name}, {info.shape}): pass a model with 1-D inputs")
        row[name] = sample[info.kind]
    return json.dumps({"instances": [row]}).encode()


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(latencies_s, q) * 1000) if latencies_s else float("nan")


def naive_loop(version_dir: str, body: bytes, duration_s: float, max_requests: int) -> Result:
    """The baseline: per request, parse JSON, call the signature on that one row, encode the answer."""
    model = tf.saved_model.load(version_dir)
    fn = model.signatures["serving_default"]
    dtypes = {k: spec.dtype for k, spec in fn.structured_input_signature[1].items()}

    def handle(raw: bytes) -> bytes:
        rows = json.loads(raw)["instances"]
        inputs = {k: tf.constant([row[k] for row in rows], dtype=dtypes[k]) for k in dtypes}
        outputs = fn(**inputs)
        return json.dumps({"predictions": next(iter(outputs.values())).numpy().tolist()}).encode()

    for _ in range(20):
        handle(body)
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + duration_s
    while len(latencies) < max_requests and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        handle(body)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return Result(
        "naive loop", 1, len(latencies), 0, elapsed, percentile_ms(latencies, 50), percentile_ms(latencies, 99)
    )


# The fastest any uvicorn server can answer on this machine: an ASGI app that reads the body and returns a
# constant. Its throughput bounds what the model server (or anything else on uvicorn) could reach.
_NOOP_APP = """
import sys, uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = b'{"model_version_status": []}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


class ServerProcess:
    """A server in a subprocess on a free loopback port; stopped with SIGINT like a user's Ctrl-C."""

    def __init__(self, args: list[str], model_name: str, processes: int = 1):
        self.processes = processes  # server processes to wait for (each logs its startup at info level)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/models/{model_name}"
        self.log = tempfile.NamedTemporaryFile("w+")  # closed in __exit__
        cmd = [sys.executable, *[a.replace("{port}", str(self.port)) for a in args]]
        env = {**os.environ, "PYTHONPATH": ROOT}
        # The server appends (O_APPEND), so reading the log here never moves where it writes.
        with open(self.log.name, "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    @classmethod
    def model_server(
        cls, base_path: str, model_name: str, batching: bool, args: argparse.Namespace, workers: int = 1
    ) -> ServerProcess:
        """`python -m beam_pipeline serve` with the benchmark's batching settings."""
        flags = {
            "--workers": str(workers),
            "--model_base_path": base_path,
            "--model_name": model_name,
            "--port": "{port}",
            "--log_level": "info",  # uvicorn logs each worker's "Application startup complete."
            "--max_batch_size": str(args.max_batch_size),
            "--batch_timeout_ms": str(args.batch_timeout_ms),
        }
        cmd = ["-m", "beam_pipeline", "serve", *[x for kv in flags.items() for x in kv]]
        return cls([*cmd, "--enable_batching" if batching else "--no-enable_batching"], model_name, workers)

    def __enter__(self) -> ServerProcess:
        for _ in range(1200):
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{self.log.read()}")
            try:
                if httpx.get(self.url, timeout=5).status_code == 200 and self._started() >= self.processes:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("server did not come up in 120 s")

    def _started(self) -> int:
        """How many server processes finished starting (a worker still loading the model steals CPU)."""
        if self.processes == 1:
            return 1
        self.log.seek(0)
        return self.log.read().count("Application startup complete.")

    def __exit__(self, *_exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
local done = 0
function response(status, headers, body)
  done = done + 1
  if done >= %d then wrk.thread:stop() end
end
"""


def _wrk_ms(text: str, label: str) -> float:
    match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not match:
        raise ValueError(f"no {label} latency in wrk output:\n{text}")
    return float(match[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match[2]]


def run_wrk(url: str, body: bytes, concurrency: int, duration_s: float, max_requests: int, mode: str) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % (body.decode(), max_requests))  # one wrk thread: its count is the total
    try:
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s:g}s", "--latency", "-s", script.name, url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not match:
        raise ValueError(f"unexpected wrk output:\n{out}")
    seconds = float(match[2]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match[3]]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non_2xx[1]) if non_2xx else 0
    errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return Result(mode, concurrency, int(match[1]), errors, seconds, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"))


def run_httpx(url: str, body: bytes, concurrency: int, duration_s: float, max_requests: int, mode: str) -> Result:
    """Fallback load generator when wrk is missing: `concurrency` asyncio workers on keep-alive connections."""

    async def main() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        errors = 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            start = time.perf_counter()
            deadline = start + duration_s

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                    t0 = time.perf_counter()
                    r = await client.post(url, content=body, headers=headers)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies, errors, time.perf_counter() - start

    latencies, errors, seconds = asyncio.run(main())
    return Result(
        mode,
        concurrency,
        len(latencies) + errors,
        errors,
        seconds,
        percentile_ms(latencies, 50),
        percentile_ms(latencies, 99),
    )


def render(results: list[Result], meta: dict[str, Any]) -> str:
    naive = next(r for r in results if r.mode == "naive loop")
    by_key = {(r.mode, r.concurrency): r for r in results}
    lines = [
        f"`python benchmarks/serving_load.py` on {meta['date']}: {meta['model']}; load generator {meta['generator']}, "
        f"{meta['duration']:g} s or {meta['max_requests']} requests per run; {meta['cpus']} CPUs, "
        f"load average {meta['load']} before the run (the machine is shared, so numbers vary between runs).",
        "",
        "| mode | concurrency | requests | errors | req/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.requests} | {r.errors} | {r.throughput:,.0f} | "
            f"{r.p50_ms:.2f} | {r.p99_ms:.2f} |"
        )
    lines.append("")
    single = by_key.get(("batching on", 1))
    if single is not None:
        verdict = "met" if single.p50_ms <= TARGET_P50_MS else "NOT met"
        lines.append(
            f"- p50 at concurrency 1 (batching on): {single.p50_ms:.2f} ms; target <= {TARGET_P50_MS:g} ms: {verdict}."
        )
    top = max(r.concurrency for r in results)
    batched, unbatched = by_key.get(("batching on", top)), by_key.get(("batching off", top))
    multi = meta["multi_mode"]
    for r in (by_key.get((multi, top)), batched):
        if r is None:
            continue
        ratio = r.throughput / naive.throughput
        verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        lines.append(
            f"- {r.mode} at concurrency {top} vs the naive loop: {ratio:.2f}x throughput; "
            f"target >= {TARGET_SPEEDUP:g}x: {verdict}."
        )
    if batched is not None and unbatched is not None:
        lines.append(
            f"- batching on vs off at concurrency {top}: {batched.throughput / unbatched.throughput:.2f}x throughput."
        )
    ceiling = by_key.get(("no-op uvicorn app (ceiling)", top))
    if ceiling is not None:
        lines.append(
            f"- a no-op uvicorn app answers {ceiling.throughput:,.0f} req/s at concurrency {top}, "
            f"{ceiling.throughput / naive.throughput:.1f}x the naive loop: no server on uvicorn can beat that here."
        )
    lines.append(
        f"- one direct signature call (batch of 1) takes {meta['call_ms']:.2f} ms; "
        f"a batch of 64 takes {meta['call64_ms']:.2f} ms."
    )
    return "\n".join(lines) + "\n"


def call_cost_ms(version_dir: str, body: bytes, rows: int) -> float:
    """Median time of one direct signature call on `rows` copies of the request's row."""
    fn = tf.saved_model.load(version_dir).signatures["serving_default"]
    row = json.loads(body)["instances"][0]
    dtypes = {k: spec.dtype for k, spec in fn.structured_input_signature[1].items()}
    inputs = {k: tf.constant([row[k]] * rows, dtype=dtypes[k]) for k in dtypes}
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        fn(**inputs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


@contextlib.contextmanager
def _model(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(base path, description) of the model to serve: the given one, or the demo model in a temp dir."""
    if args.model_base_path:
        yield args.model_base_path, f"model from {args.model_base_path}"
        return
    tmp = tempfile.mkdtemp(prefix="serving_load_")
    try:
        write_demo_model(os.path.join(tmp, "1"), hidden_units=tuple(args.hidden_units))
        hidden = f", dense layers {args.hidden_units}" if args.hidden_units else ""
        yield tmp, f"demo model of beam_pipeline.serving.testing (3 raw features{hidden})"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_base_path", help="default: write the demo model to a temp dir")
    parser.add_argument("--model_name", default="bench")
    parser.add_argument("--hidden_units", type=int, nargs="*", default=[], help="dense layers of the demo model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--max_requests", type=int, default=200_000, help="requests per run at most")
    parser.add_argument("--max_batch_size", type=int, default=64)
    parser.add_argument("--batch_timeout_ms", type=float, default=1.0)
    parser.add_argument("--generator", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="server processes for the multi-worker runs"
    )
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not update RESULTS.md")
    args = parser.parse_args()

    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "httpx"
    drive = run_wrk if generator == "wrk" else run_httpx
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    with _model(args) as (base_path, description):
        version_dir = _latest_version_dir(base_path)
        body = request_body(version_dir)
        results = [naive_loop(version_dir, body, args.duration, args.max_requests)]
        print(f"naive loop: {results[0].throughput:,.0f} req/s, p50 {results[0].p50_ms:.2f} ms", flush=True)
        multi_mode = f"batching on, {args.workers} workers"
        name, levels = args.model_name, args.concurrency
        servers = [  # started one at a time, so an idle server never shares the CPUs with a timed run
            (multi_mode, lambda: ServerProcess.model_server(base_path, name, True, args, args.workers), levels),
            ("batching on", lambda: ServerProcess.model_server(base_path, name, True, args), levels),
            ("batching off", lambda: ServerProcess.model_server(base_path, name, False, args), levels),
            ("no-op uvicorn app (ceiling)", lambda: ServerProcess(["-c", _NOOP_APP, "{port}"], "x"), [max(levels)]),
        ]
        for mode, start_server, concurrencies in servers:
            with start_server() as server:
                url = f"{server.url}:predict"
                # At full concurrency, so every worker process has served (and warmed up) before the timed runs.
                drive(url, body, max(args.concurrency), 5.0, 20000, "warm-up")
                for concurrency in concurrencies:
                    r = drive(url, body, concurrency, args.duration, args.max_requests, mode)
                    results.append(r)
                    print(
                        f"{mode} c={concurrency}: {r.throughput:,.0f} req/s, p50 {r.p50_ms:.2f} ms, "
                        f"p99 {r.p99_ms:.2f} ms, errors {r.errors}",
                        flush=True,
                    )
        meta = {
            "date": datetime.date.today().isoformat(),
            "model": description,
            "generator": f"wrk ({shutil.which('wrk')})" if generator == "wrk" else "asyncio + httpx",
            "duration": args.duration,
            "max_requests": args.max_requests,
            "cpus": os.cpu_count(),
            "load": load,
            "multi_mode": multi_mode,
            "call_ms": call_cost_ms(version_dir, body, 1),
            "call64_ms": call_cost_ms(version_dir, body, 64),
        }
    body = render(results, meta)
    print(f"\n## {SECTION}\n\n{body}")
    if args.write:
        write_section(SECTION, body)
        print(f"wrote the {SECTION!r} section of {RESULTS_MD}")


if __name__ == "__main__":
    main()
