"""The whole taxi pipeline on Beam's portable runner: SDK workers in other processes, over the Fn API."""

from __future__ import annotations

import os

import pytest

from beam_pipeline import launcher
from examples.chicago_taxi.pipeline import create_pipeline


@pytest.mark.slow
def test_the_whole_taxi_pipeline_runs_on_the_portable_runner(tmp_path, taxi_small_csv):
    """User-module functions travel by value: a worker cannot import the driver's module names."""
    from runners.options import local_portable_services

    pipeline = create_pipeline(
        pipeline_root=str(tmp_path / "root"),
        data_path=taxi_small_csv,
        train_steps=20,
        serving_model_dir=str(tmp_path / "serving"),
    )
    with local_portable_services() as args:
        result = launcher.run(pipeline, args)
    assert {c.id: c.state for c in result.components.values()} == dict.fromkeys(
        [c.id for c in pipeline.ordered], "COMPLETE"
    )
    model = result.artifact("Trainer", "model")
    assert os.path.exists(os.path.join(model.uri, "Format-Serving", "saved_model.pb"))
    rows = result.artifact("ExampleGen", "examples").properties["row_counts"]
    assert sum(rows.values()) == 1500
    evaluation = result.artifact("Evaluator", "evaluation")
    assert evaluation.uri and os.listdir(evaluation.uri)
