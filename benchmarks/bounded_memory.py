"""Data half + Transform at growing row counts: wall time, rows/s and peak memory of the whole run.

Each size runs `beam-pipeline run benchmarks/data_half_pipeline.py --no-cache` in its own process
on the default runner, as a user would, and samples the resident memory of that process and all
its children every 0.2 s (their sum is "tree"; "largest" is the biggest single process's VmHWM).
Data is resampled taxi rows (`scale_data.py`); sizes above `--keep-rows` are generated for the run
and deleted afterwards. Prints one line per size and records the table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks.memory import PeakMemory  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.scale_data import scale  # noqa: E402

PIPELINE = os.path.join(HERE, "data_half_pipeline.py")
CLI = os.path.join(os.path.dirname(sys.executable), "beam-pipeline")
# One row of the run's summary table: component, state, busy seconds, committed at.
# Issue 11's bounds on the whole process tree.
_TARGETS_MB = {5_000_000: 3 * 1024, 50_000_000: 8 * 1024}
_ROW = re.compile(r"│ (\w+) +│ (\w+) +│ ([\d.]+)s +│ \+([\d.]+)s")


def run_once(csv: str, root: str) -> dict:
    env = dict(os.environ, TAXI_DATA=csv, PIPELINE_ROOT=root, TF_USE_LEGACY_KERAS="1", COLUMNS="250")
    with PeakMemory(interval_s=0.2, include_self=False) as memory:
        start = time.perf_counter()
        proc = subprocess.run([CLI, "run", PIPELINE, "--no-cache"], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run on {csv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    components = {m[1]: (m[2], float(m[3]), float(m[4])) for m in _ROW.finditer(proc.stdout)}
    largest = max((kb for _, kb in memory.peaks.values()), default=0)
    return {"wall": wall, "tree_kb": memory.tree_kb, "largest_kb": largest, "components": components}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[510_000, 5_000_000])
    parser.add_argument("--work-dir", default="/var/tmp/bp-bench-memory", help="data and roots (not /tmp)")
    parser.add_argument("--keep-rows", type=int, default=5_000_000, help="keep generated data up to this size")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    lines = [
        "| rows | CSV MB | wall s | rows/s | Transform busy s | Transform committed at s "
        "| peak tree MB | largest process MB |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    targets: list[str] = []
    for rows in args.rows:
        csv = scale(rows, os.path.join(args.work_dir, f"taxi_{rows}.csv"))
        root = os.path.join(args.work_dir, f"root_{rows}")
        shutil.rmtree(root, ignore_errors=True)
        try:
            r = run_once(csv, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            size_mb = os.path.getsize(csv) / 2**20
            if rows > args.keep_rows:
                os.remove(csv)
                os.remove(f"{csv}.rows")
        _, busy, committed = r["components"].get("Transform", ("", float("nan"), float("nan")))
        line = (
            f"| {rows:,} | {size_mb:,.0f} | {r['wall']:.1f} | {rows / r['wall']:,.0f} | {busy:.1f} | {committed:.1f} "
            f"| {r['tree_kb'] / 1024:,.0f} | {r['largest_kb'] / 1024:,.0f} |"
        )
        print(line, flush=True)
        lines.append(line)
        limit = _TARGETS_MB.get(rows)
        if limit:
            met = "met" if r["tree_kb"] / 1024 <= limit else "NOT met"
            targets.append(f"peak at {rows:,} rows {r['tree_kb'] / 1024:,.0f} MB; target <= {limit:,} MB: {met}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join(lines) + (
        f"\n\n- default runner (Beam's in-process FnApiRunner), {os.cpu_count()} cores, caching off; "
        f"load average {load} at the end.\n- wall: the whole `beam-pipeline run` command, imports included; "
        "peak tree: the largest sum of resident memory over the command's processes, sampled every 0.2 s."
    )
    text += "".join(f"\n- {t}" for t in targets)
    if not args.no_record:
        sizes = " ".join(str(r) for r in args.rows)
        write_section(
            "Data half + Transform: memory as the data grows",
            f"`python benchmarks/bounded_memory.py --rows {sizes}`\n\n{text}",
        )


if __name__ == "__main__":
    main()
