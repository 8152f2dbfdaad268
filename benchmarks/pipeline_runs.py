"""The full Chicago taxi pipeline cold, then again with nothing changed, timed in one run.

Prints per-component processing time (what the runner measured in each component's transforms),
when each component committed, and the wall time of both runs; records them in RESULTS.md.
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
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples", "chicago_taxi"))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from pipeline import create_pipeline  # noqa: E402

from beam_pipeline import launcher  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.scale_data import scale  # noqa: E402


def timed_run(root: str, train_steps: int, data: str | None) -> tuple[float, launcher.RunResult]:
    kwargs = {"data_path": data} if data else {}
    start = time.perf_counter()
    result = launcher.run(create_pipeline(pipeline_root=root, train_steps=train_steps, **kwargs))
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=0, help="resampled taxi rows (default: the 15k-row sample)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data = scale(args.rows, os.path.join(HERE, "data", f"taxi_{args.rows}.csv")) if args.rows else None
    root = tempfile.mkdtemp(prefix="bench-pipeline-", dir="/var/tmp")
    try:
        cold_s, cold = timed_run(root, args.train_steps, data)
        warm_s, warm = timed_run(root, args.train_steps, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        "| component | cold: state | cold: busy s | cold: committed at s | unchanged: state |",
        "|---|---|--:|--:|---|",
    ]
    for cid, r in cold.components.items():
        at = (r.end_time_ms - cold.start_ms) / 1000 if r.end_time_ms else None
        busy = f"{r.busy_s:.1f}" if r.busy_s is not None else ""
        rows.append(f"| {cid} | {r.state} | {busy} | {at:.1f} | {warm.components[cid].state} |")
    summary = [
        f"cold run (train_steps={args.train_steps}): {cold_s:.1f} s wall",
        f"second run, nothing changed: {warm_s:.1f} s wall ({cold_s / warm_s:.0f}x faster; every component reused)",
    ]
    text = "\n".join(rows) + "\n\n" + "\n".join(f"- {line}" for line in summary)
    print(text)
    if not args.no_record:
        size = f" at {args.rows:,} rows" if args.rows else ""
        flag = f" --rows {args.rows}" if args.rows else ""
        write_section(
            f"Full taxi pipeline{size}: cold and unchanged rerun",
            f"`python benchmarks/pipeline_runs.py --train-steps {args.train_steps}{flag}` "
            f"(default runner: Beam's in-process FnApiRunner, {os.cpu_count()} cores)\n\n" + text,
        )


if __name__ == "__main__":
    main()
