"""The data half + Transform on N taxi rows, on the default runner vs `portable-local`, in one run.

`portable-local` is Beam's Python job service plus an SDK worker pool, separate processes talking the
Fn API as on a cluster (here: the only distributed runner whose parts this machine can obtain; Beam's
Flink and Spark job-server jars are not served by its Maven mirror). Both sides run ExampleGen →
StatisticsGen → SchemaGen → Transform with caching off, from the same CSV. For each side: wall time,
rows/s, and the peak resident memory of every process of the run (children's VmHWM; the driver's
VmRSS sampled every 0.5 s), read from /proc while it runs. Records the table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Local roots under --work-dir: this measures the runner, so its workers may share the driver's disk.
os.environ.setdefault("BEAM_PIPELINE_ISOLATE_WORKERS", "0")

from beam_pipeline import Pipeline, launcher  # noqa: E402
from benchmarks.memory import PeakMemory  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.scale_data import scale  # noqa: E402
from runners.options import runner_args  # noqa: E402
from transforms.example_gen import ExampleGen  # noqa: E402
from transforms.schema_gen import SchemaGen  # noqa: E402
from transforms.statistics_gen import StatisticsGen  # noqa: E402
from transforms.transform import Transform  # noqa: E402

MODULE = os.path.join(os.path.dirname(HERE), "examples", "chicago_taxi", "taxi_utils.py")


def run_side(csv: str, root: str, runner: str | None) -> tuple[float, int, PeakMemory]:
    gen = ExampleGen(input_base=csv)
    stats = StatisticsGen(examples=gen.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    transform = Transform(examples=gen.outputs.examples, schema=schema.outputs.schema, module_file=MODULE)
    pipeline = Pipeline("bench-distributed", root, [gen, stats, schema, transform])
    with PeakMemory() as memory, runner_args(runner) as args:
        start = time.perf_counter()
        result = launcher.run(pipeline, args, enable_cache=False)
        elapsed = time.perf_counter() - start
    rows = sum(result.artifact("ExampleGen", "examples").properties["row_counts"].values())
    return elapsed, rows, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--work-dir", default="/var/tmp/bp-bench-distributed", help="data and roots (not /tmp)")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()

    os.makedirs(args.work_dir, exist_ok=True)
    csv = scale(args.rows, os.path.join(args.work_dir, f"taxi_{args.rows}.csv"))
    mb = os.path.getsize(csv) / 1e6
    rows_out = []
    sides = (
        ("default (in-process FnApiRunner)", None),
        ("portable-local (job service + SDK workers)", "portable-local"),
    )
    for name, runner in sides:
        root = tempfile.mkdtemp(prefix="root-", dir=args.work_dir)
        try:
            elapsed, rows, memory = run_side(csv, root, runner)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        peaks = memory.by_label()
        parts = [f"driver {memory.driver_kb / 1024:,.0f} MB (sampled peak)"]
        for label, kbs in sorted(peaks.items()):
            parts.append(f"{label} ×{len(kbs)}: max {max(kbs) / 1024:,.0f} MB")
        rows_out.append((name, elapsed, rows, "; ".join(parts)))
        print(f"{name}: {elapsed:.1f} s, {rows / elapsed:,.0f} rows/s; {'; '.join(parts)}", flush=True)

    base, dist = rows_out[0][1], rows_out[1][1]
    lines = [
        f"`python benchmarks/distributed_runs.py --rows {args.rows}` ({args.rows:,} rows, {mb:,.0f} MB CSV, "
        f"2 cores; ExampleGen → StatisticsGen → SchemaGen → Transform, caching off)",
        "",
        "| runner | wall s | rows/s | peak resident memory per process |",
        "|---|--:|--:|---|",
    ]
    lines += [f"| {n} | {e:.1f} | {r / e:,.0f} | {m} |" for n, e, r, m in rows_out]
    lines += [
        "",
        f"- portable-local / default wall time: {dist / base:.2f}x",
        "- The Flink and Spark job-server jars Beam needs are not served by this machine's Maven mirror,"
        " so no Flink/Spark numbers (see README, Runners).",
    ]
    print("\n".join(lines))
    if not args.no_record:
        write_section("Data half + Transform: default runner vs portable-local", "\n".join(lines))


if __name__ == "__main__":
    main()
