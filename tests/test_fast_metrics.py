"""Per-batch TFMA metrics give what TFMA's per-example evaluator gives: same keys, values, plots, validations."""

from __future__ import annotations

import glob
import math
import os

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow_model_analysis as tfma
from google.protobuf import json_format
from tensorflow_model_analysis.api import model_eval_lib
from tensorflow_model_analysis.evaluators import metrics_plots_and_validations_evaluator as tfma_mpv
from tensorflow_model_analysis.extractors import slice_key_extractor, unbatch_extractor

from beam_pipeline.errors import InputDataError
from tests.helpers import store_at
from transforms import _fast_metrics, evaluator
from transforms.eval_config import binary_classification_eval_config, candidate_config
from transforms.evaluate_model import EvaluateModel


# -- comparing two TFMA output directories ------------------------------------------------------------------
def _metrics(path: str) -> dict:
    out = {}
    for m in tfma.load_metrics(path):
        slice_key = json_format.MessageToJson(m.slice_key, sort_keys=True)
        for kv in m.metric_keys_and_values:
            out[(slice_key, json_format.MessageToJson(kv.key, sort_keys=True))] = json_format.MessageToDict(kv.value)
    return out


def _close(a, b, path="") -> None:
    """Equal structures, numbers equal to float32 precision (Keras metrics run in float32)."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), (path, a, b)
        for k in b:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(b, (int, float)) or (isinstance(b, str) and b in ("NaN", "Infinity", "-Infinity")):
        x, y = float(a), float(b)
        assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _same_results(fast: str, tfma_path: str) -> None:
    fast_metrics, tfma_metrics = _metrics(fast), _metrics(tfma_path)
    assert tfma_metrics and set(fast_metrics) == set(tfma_metrics)
    _close(fast_metrics, tfma_metrics)
    fast_plots, tfma_plots = (
        {p.slice_key.SerializeToString(): json_format.MessageToDict(p) for p in tfma.load_plots(path)}
        for path in (fast, tfma_path)
    )
    assert tfma_plots and set(fast_plots) == set(tfma_plots)
    _close(fast_plots, tfma_plots)
    fast_validation, tfma_validation = (_validation(path) for path in (fast, tfma_path))
    _close(fast_validation, tfma_validation)


def _validation(path: str) -> dict:
    result = tfma.load_validation_result(path)
    failures = {
        s.slice_key.SerializeToString(): json_format.MessageToDict(s) for s in result.metric_validations_per_slice
    }
    return {"ok": result.validation_ok, "failures": failures}


# -- hand-built batched extracts: TFMA's per-example path on the same extracts is the reference -------------
def _extracts(seed: int, batches: int = 3, rows: int = 400, baseline: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        label = rng.choice([0.0, 1.0, 0.3], size=(rows, 1), p=[0.5, 0.4, 0.1])
        prediction = np.clip(label[:, 0] * 0.6 + rng.normal(0.2, 0.25, rows), -0.1, 1.1).astype(np.float32)
        prediction[:5] = [0.0, 0.5, 1.0, 0.25, 0.0001]  # bucket and threshold boundaries
        kinds = [np.array([b"cash"]), np.array([b"card", b"cash"]), np.array([], dtype=object), np.array([b"card"])]
        extract = {
            tfma.FEATURES_KEY: {
                "hour": rng.integers(0, 4, size=(rows, 1)),
                "kind": tfma.types.VarLenTensorValue.from_dense_rows([kinds[i % 4] for i in range(rows)]),
            },
            tfma.LABELS_KEY: label,
            tfma.PREDICTIONS_KEY: prediction.reshape(rows, 1),
            tfma.EXAMPLE_WEIGHTS_KEY: rng.uniform(0.5, 2.0, size=(rows, 1)),
        }
        if baseline:
            other = np.clip(prediction + rng.normal(0, 0.1, rows).astype(np.float32), 0, 1).reshape(rows, 1)
            extract[tfma.PREDICTIONS_KEY] = {"candidate": prediction.reshape(rows, 1), "baseline": other}
        out.append(extract)
    return out


def _synthetic_config(baseline: bool) -> tfma.EvalConfig:
    config = binary_classification_eval_config(
        "label",
        slice_features=["hour", "kind"],
        lower_bounds={"auc": 0.7},
        upper_bounds={"binary_crossentropy": 0.9},
        max_regression={"auc": 0.0} if baseline else None,
    )
    config.model_specs[0].ClearField("preprocessing_function_names")
    for name in ("MeanLabel", "MeanPrediction", "Precision", "Recall", "ConfusionMatrixPlot", "LogCoshError"):
        config.metrics_specs[0].metrics.add(class_name=name)  # more of TFMA's derived metrics, one more Keras one
    config.model_specs[0].example_weight_key = "w"
    config.metrics_specs[0].example_weights.weighted = True
    config.metrics_specs[0].example_weights.unweighted = True
    if baseline:
        config.model_specs[0].name = "candidate"
        config.model_specs.add(name="baseline", label_key="label", example_weight_key="w", is_baseline=True)
    return tfma.utils.update_eval_config_with_defaults(config, has_baseline=baseline, rubber_stamp=not baseline)


def _write(evaluation, config: tfma.EvalConfig, path: str) -> None:
    writers = model_eval_lib.default_writers(path, eval_config=config)
    _ = evaluation | f"Write {os.path.basename(path)}" >> model_eval_lib.WriteResults(writers=writers)


@pytest.mark.parametrize("baseline", [False, True], ids=["one model", "with baseline"])
def test_per_batch_metrics_equal_tfmas_per_example_metrics(tmp_path, baseline):
    """Weighted and unweighted, fractional labels, boundary predictions, a multivalent bytes slice feature,
    rows without it, and a baseline model's diffs and change thresholds."""
    config = _synthetic_config(baseline)
    assert _fast_metrics.supported(config)
    fast, reference = str(tmp_path / "fast"), str(tmp_path / "tfma")
    with beam.Pipeline() as p:
        extracts = p | beam.Create(_extracts(seed=7, baseline=baseline), reshuffle=False)
        _write(extracts | "Fast" >> _fast_metrics.evaluator(config).ptransform, config, fast)
        per_example = (
            extracts
            | "Unbatch" >> unbatch_extractor.UnbatchExtractor().ptransform
            | "Slices" >> slice_key_extractor.SliceKeyExtractor(eval_config=config).ptransform
        )
        evaluation = per_example | "TFMA" >> tfma_mpv.MetricsPlotsAndValidationsEvaluator(config).ptransform
        _write(evaluation, config, reference)
    _same_results(fast, reference)
    assert len({k[0] for k in _metrics(fast)}) == 1 + 4 + 2, "overall, 4 hours, 2 kinds"


def test_configs_outside_the_per_batch_path_run_tfmas_own_evaluator():
    base = candidate_config(binary_classification_eval_config("tips_xf", slice_features=["trip_start_hour"]))
    assert _fast_metrics.supported(tfma.utils.update_eval_config_with_defaults(base))
    unsupported = []
    multi_class = tfma.EvalConfig()
    multi_class.CopyFrom(base)
    multi_class.metrics_specs[0].metrics.add(class_name="MultiClassConfusionMatrixPlot")
    unsupported.append(multi_class)
    small_slices = tfma.EvalConfig()
    small_slices.CopyFrom(base)
    small_slices.options.min_slice_size.value = 10
    unsupported.append(small_slices)
    by_value = tfma.EvalConfig()
    by_value.CopyFrom(base)
    by_value.slicing_specs.add(feature_values={"payment_type": "Cash"})
    unsupported.append(by_value)
    intervals = tfma.EvalConfig()
    intervals.CopyFrom(base)
    intervals.options.compute_confidence_intervals.value = True
    unsupported.append(intervals)
    for config in unsupported:
        assert not _fast_metrics.supported(tfma.utils.update_eval_config_with_defaults(config)), config


def _one_batch(**overrides) -> dict:
    batch = _extracts(seed=1, batches=1, rows=8)[0]
    batch.update(overrides)
    return batch


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({tfma.LABELS_KEY: np.full((8, 1), 2.0)}, r"label 2.0 is not in \[0, 1\]"),
        ({tfma.PREDICTIONS_KEY: np.full((8, 1), np.nan, np.float32)}, "predicted NaN for 8 of 8 examples"),
        (
            {tfma.PREDICTIONS_KEY: np.full((8, 3), 0.3, np.float32)},
            "one prediction per example, model candidate gives 3",
        ),
        ({tfma.PREDICTIONS_KEY: {"logits": np.zeros((8, 1))}}, r"dict with keys \['logits'\]: name the output"),
        ({tfma.LABELS_KEY: np.zeros((5, 1))}, "5 labels for a batch of 8 examples"),
    ],
)
def test_bad_model_outputs_fail_with_what_was_expected(overrides, message):
    config = _synthetic_config(baseline=False)
    fn = _fast_metrics._Accumulate(config, _fast_metrics._computations(config).non_derived_computations)
    fn.setup()
    fn.start_bundle()
    with pytest.raises(InputDataError, match=message):
        list(fn.process(_one_batch(**overrides)))


# -- a real model on the taxi data -------------------------------------------------------------------------
def _evaluate(config: tfma.EvalConfig, models: list[str], data: str, path: str, per_batch: bool) -> None:
    """EvaluateModel in a bare Beam pipeline: candidate `models[0]` against baseline `models[1]`."""
    with beam.Pipeline() as p:
        _ = (
            p
            | beam.Create([data])
            | beam.FlatMap(lambda f: pq.read_table(f).to_batches(max_chunksize=700))
            | EvaluateModel(models[0], config, path, baseline_path=models[1], vectorized_metrics=per_batch)
        )


@pytest.mark.slow
def test_taxi_model_and_its_baseline_get_tfmas_metrics_per_batch(model_store, tmp_path):
    store = store_at(model_store["root"])
    wanted = [model_store["a"]["examples"], model_store["b"]["model"], model_store["a"]["model"]]
    by_id = {a.id: a for a in store.mlmd.get_artifacts_by_id(wanted)}
    examples, model_b, model_a = (by_id[i] for i in wanted)
    data = glob.glob(os.path.join(examples.uri, "Split-eval", "*.parquet"))
    models = [os.path.join(m.uri, evaluator.SERVING_MODEL_DIR) for m in (model_b, model_a)]
    config = candidate_config(
        binary_classification_eval_config(
            "tips_xf",
            slice_features=["trip_start_hour", "payment_type"],
            lower_bounds={"auc": 0.6},
            max_regression={"auc": 0.0, "binary_crossentropy": 0.0},
        )
    )
    assert len(data) == 1
    assert _fast_metrics.supported(tfma.utils.update_eval_config_with_defaults(config, has_baseline=True))
    fast, reference = str(tmp_path / "fast"), str(tmp_path / "tfma")
    _evaluate(config, models, data[0], fast, per_batch=True)
    _evaluate(config, models, data[0], reference, per_batch=False)
    _same_results(fast, reference)
    overall = next(m for m in tfma.load_metrics(fast) if not m.slice_key.single_slice_keys)
    auc = [
        kv.value.double_value.value
        for kv in overall.metric_keys_and_values
        if kv.key.name == "auc" and kv.key.model_name == tfma.CANDIDATE_KEY and not kv.key.is_diff
    ]
    assert len(auc) == 1 and 0.7 < auc[0] <= 1.0, "a real model, not a degenerate one"
