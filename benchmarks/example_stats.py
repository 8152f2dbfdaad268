"""ExampleGen + StatisticsGen on N resampled taxi rows vs `tfdv.generate_statistics_from_csv`, in one run.

Both sides are timed in this process after imports, from the call to its return; each builds and
runs its own Beam job: ours on its default runner (Beam's in-process FnApiRunner), tfdv on Beam's
DirectRunner (which falls back to that same runner here, after trying Prism: well under a second
of its time). Prints rows/s and the ratio, and records them in RESULTS.md.
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

import tensorflow_data_validation as tfdv  # noqa: E402

from beam_pipeline import Pipeline, launcher  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.scale_data import scale  # noqa: E402
from transforms.example_gen import ExampleGen  # noqa: E402
from transforms.statistics_gen import StatisticsGen  # noqa: E402


def ours(path: str, beam_args: list[str]) -> tuple[float, int]:
    root = tempfile.mkdtemp(prefix="bench-ours-")
    try:
        gen = ExampleGen(input_base=path)
        stats = StatisticsGen(examples=gen.outputs.examples)
        start = time.perf_counter()
        result = launcher.run(Pipeline("bench", root, [gen, stats]), beam_args, enable_cache=False)
        elapsed = time.perf_counter() - start
        return elapsed, sum(result.artifact("ExampleGen", "examples").properties["row_counts"].values())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def baseline(path: str) -> float:
    out = tempfile.mkdtemp(prefix="bench-tfdv-")
    try:
        start = time.perf_counter()
        tfdv.generate_statistics_from_csv(path, output_path=os.path.join(out, "stats.tfrecord"))
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=510_000)
    parser.add_argument("--probe-rows", type=int, default=51_000, help="a smaller run that separates fixed costs")
    parser.add_argument("--beam-args", default="", help="extra Beam options for our side, space separated")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    beam_args = args.beam_args.split()
    timings = {}
    for n in (args.probe_rows, args.rows):
        path = scale(n, os.path.join(HERE, "data", f"taxi_{n}.csv"))
        t_ours, rows = ours(path, beam_args)
        timings[n] = (t_ours, baseline(path), rows, os.path.getsize(path))
    (small_ours, small_base, small_rows, _), (t_ours, t_base, rows, size) = timings[args.probe_rows], timings[args.rows]
    marginal_ours = (rows - small_rows) / max(t_ours - small_ours, 1e-9)
    marginal_base = (rows - small_rows) / max(t_base - small_base, 1e-9)
    lines = [
        f"rows: {rows:,} ({size / 1e6:.0f} MB CSV), machine: {os.cpu_count()} cores, one process; ours on Beam's "
        "FnApiRunner (our default), tfdv on Beam's DirectRunner",
        "ours (ExampleGen + StatisticsGen, incl. Parquet write and ML Metadata): "
        f"{t_ours:.1f} s, {rows / t_ours:,.0f} rows/s end to end",
        f"tfdv.generate_statistics_from_csv: {t_base:.1f} s, {rows / t_base:,.0f} rows/s end to end",
        f"speed-up end to end: {t_base / t_ours:.1f}x (target >= 10x and >= 100,000 rows/s)",
        f"probe at {small_rows:,} rows: ours {small_ours:.1f} s, tfdv {small_base:.1f} s "
        f"(ours is mostly fixed Beam/TFDV graph cost at this size)",
        f"marginal throughput between the two sizes: ours {marginal_ours:,.0f} rows/s, "
        f"tfdv {marginal_base:,.0f} rows/s, ratio {marginal_ours / marginal_base:.1f}x "
        "(what the speed-up tends to as data grows)",
    ]
    print("\n".join(lines))
    if not args.no_record:
        write_section(
            "ExampleGen + StatisticsGen vs tfdv.generate_statistics_from_csv",
            f"`python benchmarks/example_stats.py --rows {args.rows}`"
            + (f" (our Beam args: `{args.beam_args}`)" if beam_args else "")
            + "\n\n"
            + "\n".join(f"- {line}" for line in lines),
        )


if __name__ == "__main__":
    main()
