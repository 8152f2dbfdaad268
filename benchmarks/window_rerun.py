"""A rolling window's next day: what reusing the spans and the analyzer cache saves over reading the window anew.

Three days of resampled taxi rows (`scale_data.py`, one seed per day) in `day-{SPAN}/`. The data half
+ Transform (`data_half_pipeline.py`, a rolling window of 2) runs on days 1-2, then day 3 arrives and
it runs again on days 2-3: ExampleGen parses day 3 only and reads day 2 back from the first run's
Parquet, Transform analyzes day 3 only (day 2 from TFT's analyzer cache). The same window is then
run in a fresh root, where nothing can be reused. Each run is `beam-pipeline run` in its own
process, as a user runs it; prints wall time, ExampleGen and Transform busy seconds and peak memory
of each, the ratios, and records them in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks.bounded_memory import _ROW  # noqa: E402
from benchmarks.memory import PeakMemory  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.scale_data import scale  # noqa: E402

PIPELINE = os.path.join(HERE, "data_half_pipeline.py")
CLI = os.path.join(os.path.dirname(sys.executable), "beam-pipeline")


def run(pattern: str, root: str) -> dict:
    env = dict(
        os.environ, TAXI_DATA=pattern, PIPELINE_ROOT=root, TAXI_WINDOW="2", TF_USE_LEGACY_KERAS="1", COLUMNS="250"
    )
    with PeakMemory(interval_s=0.2, include_self=False) as memory:
        start = time.perf_counter()
        proc = subprocess.run([CLI, "run", PIPELINE], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run on {pattern} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    busy = {m[1]: float(m[3]) for m in _ROW.finditer(proc.stdout)}
    return {"wall": wall, "tree_mb": memory.tree_kb / 1024, "busy": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows-per-day", type=int, default=500_000)
    parser.add_argument("--work-dir", default="/var/tmp/bp-bench-window", help="data and roots (not /tmp)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data = os.path.join(args.work_dir, "data")
    for day in (1, 2, 3):
        scale(args.rows_per_day, os.path.join(data, f"day-{day}", "data.csv"), seed=day)
    later = os.path.join(args.work_dir, "later-3")
    os.rename(os.path.join(data, "day-3"), later)  # day 3 arrives after the first run
    pattern = os.path.join(data, "day-{SPAN}", "*.csv")
    for name in ("root", "fresh"):
        shutil.rmtree(os.path.join(args.work_dir, name), ignore_errors=True)
    try:
        first = run(pattern, os.path.join(args.work_dir, "root"))
    finally:
        os.rename(later, os.path.join(data, "day-3"))
    reuse = run(pattern, os.path.join(args.work_dir, "root"))
    fresh = run(pattern, os.path.join(args.work_dir, "fresh"))
    lines = [
        f"Data half + Transform over a rolling window of 2 days, {args.rows_per_day:,} taxi rows a day "
        "(`benchmarks/window_rerun.py`).",
        "",
        "| run | wall s | ExampleGen busy s | Transform busy s | peak tree MB |",
        "|---|--:|--:|--:|--:|",
    ]
    for label, r in (("days 1-2 (first)", first), ("days 2-3, day 2 reused", reuse), ("days 2-3, fresh root", fresh)):
        gen, transform = r["busy"].get("ExampleGen", 0), r["busy"].get("Transform", 0)
        lines.append(f"| {label} | {r['wall']:.1f} | {gen:.1f} | {transform:.1f} | {r['tree_mb']:,.0f} |")
    ratio = {
        "wall": fresh["wall"] / reuse["wall"],
        "ExampleGen": fresh["busy"].get("ExampleGen", 0) / max(reuse["busy"].get("ExampleGen", 0), 1e-9),
        "Transform": fresh["busy"].get("Transform", 0) / max(reuse["busy"].get("Transform", 0), 1e-9),
    }
    lines += ["", "Fresh over reused: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()) + "."]
    print("\n".join(lines))
    if not args.no_record:
        write_section("Rolling window rerun", "\n".join(lines))


if __name__ == "__main__":
    main()
