"""The Evaluator on the taxi eval split at N rows: metrics per batch (ours) vs TFMA's per-example evaluator.

One pipeline root: the example pipeline up to the Trainer is run once (`prepare`), then the Evaluator
twice on the same model and eval split, uncached, each in its own process so its peak memory is its
own: with `vectorized_metrics=True` (the default) and `False` (TFMA's own evaluator, what this
project ran before). Both use the example's eval config (6 metrics and a calibration plot, overall
and per hour, with value and change thresholds). Reports the Evaluator's busy time (the runner's
processing time in its transforms), the time from its run's start to its commit, eval rows/s and
peak resident memory, and records them in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples", "chicago_taxi"))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

SIDES = {"per batch": ("Evaluator", True), "TFMA per example": ("EvaluatorPerExample", False)}
TFX_EVALUATOR_S = 38  # TFX 1.16's Evaluator on the same 170k eval rows (issue 11), not measurable here


def _pipeline(root: str, data: str, train_steps: int, side: str | None):
    from pipeline import create_pipeline

    from beam_pipeline import Pipeline
    from transforms.evaluator import Evaluator

    example = create_pipeline(pipeline_root=root, data_path=data, train_steps=train_steps)
    *upstream, evaluator, _pusher = example.components
    if side is None:
        return Pipeline(example.name, root, upstream)
    component_id, vectorized = SIDES[side]
    judged = Evaluator(
        examples=upstream[0].outputs.examples,
        model=upstream[-1].outputs.model,
        eval_config=evaluator.eval_config,
        vectorized_metrics=vectorized,
        component_id=component_id,
    ).with_cache(False)  # the two sides have the same cache key: the results are the same
    return Pipeline(example.name, root, [*upstream, judged])


def one(root: str, data: str, train_steps: int, side: str | None) -> dict:
    from beam_pipeline import launcher
    from benchmarks.memory import peak_kb

    start = time.perf_counter()
    result = launcher.run(_pipeline(root, data, train_steps, side))
    wall = time.perf_counter() - start
    out = {"wall_s": wall, "peak_mb": peak_kb() / 1024}
    if side is not None:
        r = result.components[SIDES[side][0]]
        out.update(state=r.state, busy_s=r.busy_s, committed_s=(r.end_time_ms - result.start_ms) / 1000)
        out["eval_rows"] = result.artifact("ExampleGen", "examples").properties["row_counts"]["eval"]
    return out


def _child(root: str, data: str, train_steps: int, side: str | None) -> dict:
    argv = [sys.executable, __file__, "--one", side or "", "--root", root, "--data", data]
    done = subprocess.run([*argv, "--train-steps", str(train_steps)], capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{side or 'prepare'} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=510_000)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.root, args.data, args.train_steps, args.one or None)))
        return

    from benchmarks.results import write_section
    from benchmarks.scale_data import scale

    work = tempfile.mkdtemp(prefix="bench-evaluator-")
    try:
        data = scale(args.rows, os.path.join(work, "data.csv"))
        root = os.path.join(work, "root")
        prepared = _child(root, data, args.train_steps, None)
        print(f"prepared (data half, Transform, Trainer): {prepared['wall_s']:.1f} s", flush=True)
        runs = {}
        for side in SIDES:
            runs[side] = _child(root, data, args.train_steps, side)
            print(side, json.dumps(runs[side]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs["TFMA per example"]["busy_s"]
    rows = [
        "| Evaluator | eval rows | busy s | run start to commit s | eval rows/s | vs TFMA per example | peak MB |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for side, r in runs.items():
        rows.append(
            f"| {side} | {r['eval_rows']:,} | {r['busy_s']:.1f} | {r['committed_s']:.1f} | "
            f"{r['eval_rows'] / r['busy_s']:,.0f} | {base / r['busy_s']:.1f}x | {r['peak_mb']:,.0f} |"
        )
    fast = runs["per batch"]
    notes = [
        f"`python benchmarks/evaluator_speed.py --rows {args.rows} --train-steps {args.train_steps}`; both "
        "Evaluators judge the same model on the same eval split with the example's eval config.",
        "Busy s is the runner's processing time in the Evaluator's transforms; run start to commit also counts "
        "waiting for the model, loading it and writing TFMA's output.",
    ]
    if args.rows == 510_000:
        notes.append(
            f"TFX 1.16's Evaluator took {TFX_EVALUATOR_S} s on the 170k eval rows of the 510k data (measured for issue "
            f"11 on this machine; `tfx` does not install with this stack, so it is not rerun here): ours committed "
            f"{fast['committed_s']:.1f} s after its run started, {TFX_EVALUATOR_S / fast['committed_s']:.1f}x TFX."
        )
    text = "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(text)
    if not args.no_record:
        write_section("Evaluator: metrics per batch vs TFMA per example", text)


if __name__ == "__main__":
    main()
