"""ExampleGen + StatisticsGen on N resampled taxi rows vs `tfdv.generate_statistics_from_csv`, in one run.

Every side is timed in this process after imports, from the call to its return, `--repeats` times
(min and median reported); each builds and runs its own Beam job: ours on its default runner
(Beam's in-process FnApiRunner), tfdv on Beam's DirectRunner (which falls back to that same runner
here, after trying Prism: well under a second of its time). tfdv runs twice over: as documented
(it infers column types from the data, an extra pass), and with the schema given
(`StatsOptions(schema=..., infer_type_from_schema=True)`), which is what ours does with the types it
found while fingerprinting. Each run is its own process, so its peak resident memory is its own.
Prints rows/s, ratios and peak memory, and records them in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow_data_validation as tfdv  # noqa: E402

from beam_pipeline import Pipeline, launcher  # noqa: E402
from benchmarks.memory import peak_kb  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.scale_data import scale  # noqa: E402
from transforms.example_gen import ExampleGen  # noqa: E402
from transforms.statistics_gen import StatisticsGen  # noqa: E402

SIDES = ("ours", "tfdv", "tfdv with schema")


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


def baseline(path: str, schema=None) -> float:
    """tfdv.generate_statistics_from_csv's wall time; with `schema`, without its type-inference pass."""
    out = tempfile.mkdtemp(prefix="bench-tfdv-")
    options = tfdv.StatsOptions(schema=schema, infer_type_from_schema=True) if schema is not None else None
    try:
        start = time.perf_counter()
        kwargs = {"stats_options": options} if options is not None else {}
        tfdv.generate_statistics_from_csv(path, output_path=os.path.join(out, "stats.tfrecord"), **kwargs)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_taxi_schema(path: str, schema_path: str) -> None:
    """tfdv's schema of the CSV, inferred from tfdv's own statistics (outside the timed runs)."""
    out = tempfile.mkdtemp(prefix="bench-tfdv-schema-")
    try:
        stats = tfdv.generate_statistics_from_csv(path, output_path=os.path.join(out, "s"))
        tfdv.write_schema_text(tfdv.infer_schema(stats), schema_path)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_one(side: str, path: str, schema_path: str, beam_args: list[str]) -> dict:
    """One timed run of one side in this process: seconds, rows (ours only) and peak resident KB."""
    rows = None
    if side == "ours":
        seconds, rows = ours(path, beam_args)
    elif side == "tfdv":
        seconds = baseline(path)
    else:
        seconds = baseline(path, tfdv.load_schema_text(schema_path))
    return {"seconds": seconds, "rows": rows, "peak_kb": peak_kb()}


def measure(side: str, path: str, schema_path: str, beam_args: list[str], repeats: int) -> dict:
    """min and median seconds and the largest peak memory over `repeats` runs, each in a fresh process."""
    runs = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--one", side, "--csv", path, "--schema", schema_path]
        command.append(f"--beam-args={' '.join(beam_args)}")
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    times = [r["seconds"] for r in runs]
    return {
        "min": min(times),
        "median": statistics.median(times),
        "peak_mb": max(r["peak_kb"] for r in runs) / 1024,
        "rows": runs[0]["rows"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=510_000)
    parser.add_argument("--probe-rows", type=int, default=51_000, help="a smaller run that separates fixed costs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (min and median reported)")
    parser.add_argument("--beam-args", default="", help="extra Beam options for our side, space separated")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)  # a single timed run, as JSON
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    beam_args = args.beam_args.split()
    if args.one:
        print(json.dumps(run_one(args.one, args.csv, args.schema, beam_args)))
        return
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    timings: dict[int, dict[str, dict]] = {}
    for n in (args.probe_rows, args.rows):
        path = scale(n, os.path.join(HERE, "data", f"taxi_{n}.csv"))
        schema_path = path + ".schema.pbtxt"
        write_taxi_schema(path, schema_path)
        timings[n] = {side: measure(side, path, schema_path, beam_args, args.repeats) for side in SIDES}
        for side in SIDES:
            t = timings[n][side]
            print(f"{n:,} rows, {side}: min {t['min']:.1f} s, median {t['median']:.1f} s, {t['peak_mb']:,.0f} MB")
        size = os.path.getsize(path)
    small, big = timings[args.probe_rows], timings[args.rows]
    rows, small_rows = big["ours"]["rows"], small["ours"]["rows"]
    lines = [
        f"rows: {rows:,} ({size / 1e6:.0f} MB CSV), machine: {os.cpu_count()} cores, every run its own process; "
        f"ours on Beam's FnApiRunner (our default), tfdv on Beam's DirectRunner; each side run {args.repeats} times",
    ]
    for side in SIDES:
        low, mid, peak = big[side]["min"], big[side]["median"], big[side]["peak_mb"]
        lines.append(
            f"{side}: min {low:.1f} s ({rows / low:,.0f} rows/s), median {mid:.1f} s ({rows / mid:,.0f} rows/s), "
            f"peak resident {peak:,.0f} MB (its own process)"
        )
    for side in SIDES[1:]:
        ratio_min, ratio_median = big[side]["min"] / big["ours"]["min"], big[side]["median"] / big["ours"]["median"]
        marginal_ours = (rows - small_rows) / max(big["ours"]["min"] - small["ours"]["min"], 1e-9)
        marginal_base = (rows - small_rows) / max(big[side]["min"] - small[side]["min"], 1e-9)
        lines.append(
            f"speed-up vs {side}: {ratio_min:.1f}x on min, {ratio_median:.1f}x on median; marginal throughput "
            f"between {small_rows:,} and {rows:,} rows (min times): ours {marginal_ours:,.0f} rows/s, "
            f"{side} {marginal_base:,.0f} rows/s, ratio {marginal_ours / marginal_base:.1f}x"
        )
    lines.append(
        f"probe at {small_rows:,} rows (min): "
        + ", ".join(f"{side} {small[side]['min']:.1f} s" for side in SIDES)
        + " (mostly fixed Beam/TFDV graph cost at this size)"
    )
    print("\n".join(lines))
    if not args.no_record:
        write_section(
            "ExampleGen + StatisticsGen vs tfdv.generate_statistics_from_csv",
            f"`python benchmarks/example_stats.py --rows {args.rows} --repeats {args.repeats}`"
            + (f" (our Beam args: `{args.beam_args}`)" if beam_args else "")
            + "\n\n"
            + "\n".join(f"- {line}" for line in lines),
        )


if __name__ == "__main__":
    main()
