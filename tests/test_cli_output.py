"""What `beam-pipeline run` prints: progress, the summary and real errors, none of the libraries' load-time noise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests import _fixtures_metadata as fm

NOISE = re.compile(
    r"Unable to register|cuDNN|cuFFT|cuBLAS|cuda|crcmod|RuntimeWarning|divide by zero|invalid value encountered"
    r"|TF-TRT|oneDNN|computation_placer|WARNING:|Traceback",
    re.IGNORECASE,
)
PROGRESS = re.compile(r"^\[chicago_taxi\] \w+: (RUNNING|COMPLETE|CACHED)( \(\+\d+\.\d+s\))?$")


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of the Makefile's or the test suite's quieting variables."""
    drop = ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS", "TF_USE_LEGACY_KERAS")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": fm.ROOT}


def run_cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beam_pipeline", "run", *args],
        capture_output=True, text=True, timeout=900, env=user_env(), cwd=cwd,
    )  # fmt: skip


@pytest.mark.slow
def test_a_run_prints_progress_and_summary_and_nothing_else(tmp_path):
    data = fm.sample_csv(str(tmp_path / "data.csv"), rows=300)
    pipeline = fm.pipeline_file(str(tmp_path / "pipeline.py"), str(tmp_path / "root"), data)
    done = run_cli(pipeline, *fm.BEAM_ARGS, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not NOISE.search(done.stdout + done.stderr), done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines and all(PROGRESS.match(line) for line in lines), lines  # stderr is the progress, line by line
    assert "ExampleValidator: COMPLETE" in done.stderr
    assert "summary" in done.stdout and "ML Metadata:" in done.stdout and "Report: " in done.stdout


@pytest.mark.slow
def test_a_failing_run_still_shows_its_error(tmp_path):
    pipeline = fm.pipeline_file(str(tmp_path / "pipeline.py"), str(tmp_path / "root"), str(tmp_path / "none*.csv"))
    done = run_cli(pipeline, *fm.BEAM_ARGS, cwd=str(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error:" in done.stderr and "none*.csv" in done.stderr, done.stderr[-3000:]
    assert not re.search(r"Unable to register|crcmod", done.stderr)


def test_only_tfmas_divide_warnings_are_silenced(tmp_path):
    """The CLI's filters drop numpy's divide warnings raised in TFMA's code and keep everyone else's."""
    script = textwrap.dedent(
        """
        import numpy as np
        from beam_pipeline import cli

        cli._quiet_libraries()
        for module in ("tensorflow_model_analysis.metrics.confusion_matrix_metrics", "user_module"):
            code = "np.array([1.0, 0.0]) / np.array([0.0, 0.0])"
            exec(compile(code, module.replace(".", "/") + ".py", "exec"), {"np": np, "__name__": module})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=user_env())
    assert done.returncode == 0, done.stderr
    assert "confusion_matrix_metrics" not in done.stderr
    assert "user_module.py:1: RuntimeWarning: divide by zero encountered in divide" in done.stderr
    assert "user_module.py:1: RuntimeWarning: invalid value encountered in divide" in done.stderr
