"""Eval configs for the Evaluator: the binary-classification default, parsing, and the candidate checks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_model_analysis as tfma
from google.protobuf import json_format

from beam_pipeline.errors import PipelineDefinitionError

_LOWER_IS_BETTER = {"binary_crossentropy"}


def binary_classification_eval_config(
    label_key: str,
    *,
    slice_features: Sequence[str] = (),
    lower_bounds: Mapping[str, float] | None = None,
    upper_bounds: Mapping[str, float] | None = None,
    max_regression: Mapping[str, float] | None = None,
    signature_name: str = "from_examples",
    preprocessing_function_names: Sequence[str] = ("transform_features",),
) -> tfma.EvalConfig:
    """The metrics a binary classifier is judged on, overall and per value of each slice feature.

    Metrics: example_count, binary_accuracy, auc, auc_pr, calibration (+ calibration plot) and
    binary_crossentropy. `lower_bounds`/`upper_bounds` are value thresholds by metric name;
    `max_regression` is how much worse than the baseline a metric may get (0 = no regression),
    in the metric's own better direction (lower for binary_crossentropy, higher for the others).
    """
    metrics = {
        "example_count": tfma.MetricConfig(class_name="ExampleCount"),
        "binary_accuracy": tfma.MetricConfig(class_name="BinaryAccuracy"),
        "auc": tfma.MetricConfig(class_name="AUC"),
        "auc_pr": tfma.MetricConfig(class_name="AUC", config=json.dumps({"curve": "PR", "name": "auc_pr"})),
        "calibration": tfma.MetricConfig(class_name="Calibration"),
        "binary_crossentropy": tfma.MetricConfig(class_name="BinaryCrossentropy"),
    }
    lower_bounds, upper_bounds, max_regression = lower_bounds or {}, upper_bounds or {}, max_regression or {}
    unknown = sorted((set(lower_bounds) | set(upper_bounds) | set(max_regression)) - set(metrics))
    if unknown:
        raise PipelineDefinitionError(f"thresholds for unknown metrics {unknown}; metrics are {sorted(metrics)}")
    if "calibration" in max_regression:
        raise PipelineDefinitionError("calibration has no better direction (1.0 is best): use lower/upper bounds")
    for name, config in metrics.items():
        if name in lower_bounds or name in upper_bounds:
            bounds = config.threshold.value_threshold
            if name in lower_bounds:
                bounds.lower_bound.value = lower_bounds[name]
            if name in upper_bounds:
                bounds.upper_bound.value = upper_bounds[name]
        if name in max_regression:
            tolerance = max_regression[name]
            if tolerance < 0:
                raise PipelineDefinitionError(f"max_regression[{name!r}] = {tolerance}: must be >= 0")
            change = config.threshold.change_threshold
            if name in _LOWER_IS_BETTER:
                change.direction = tfma.MetricDirection.LOWER_IS_BETTER
                change.absolute.value = tolerance
            else:
                change.direction = tfma.MetricDirection.HIGHER_IS_BETTER
                change.absolute.value = 0.0 - tolerance  # not -0.0, which reads oddly in reasons
    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                signature_name=signature_name,
                preprocessing_function_names=list(preprocessing_function_names),
                label_key=label_key,
            )
        ],
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[f]) for f in slice_features],
        metrics_specs=[tfma.MetricsSpec(metrics=[*metrics.values(), tfma.MetricConfig(class_name="CalibrationPlot")])],
    )


def parse_eval_config(value: tfma.EvalConfig | Mapping[str, Any] | str) -> tfma.EvalConfig:
    """An EvalConfig from the proto itself, its JSON text or its JSON dict."""
    config = tfma.EvalConfig()
    try:
        if isinstance(value, tfma.EvalConfig):
            config.CopyFrom(value)
        elif isinstance(value, str):
            json_format.Parse(value, config)
        elif isinstance(value, Mapping):
            json_format.ParseDict(dict(value), config)
        else:
            raise PipelineDefinitionError(
                f"eval_config must be a tfma.EvalConfig, JSON or dict, got {type(value).__name__}"
            )
    except json_format.ParseError as e:
        raise PipelineDefinitionError(f"eval_config is not a valid tfma.EvalConfig: {e}") from None
    return config


def candidate_config(config: tfma.EvalConfig) -> tfma.EvalConfig:
    """Check the user's config and fill the defaults that keep model loading out of graph construction."""
    if len(config.model_specs) > 1 or any(s.is_baseline for s in config.model_specs):
        raise PipelineDefinitionError(
            "eval_config must have one ModelSpec (the candidate); the baseline is the latest blessed model"
        )
    if not config.model_specs:
        config.model_specs.add()
    spec = config.model_specs[0]
    if not spec.label_key and not spec.label_keys:
        raise PipelineDefinitionError(
            "eval_config.model_specs[0].label_key is required (the transformed label, e.g. 'tips_xf')"
        )
    spec.name = ""
    spec.signature_name = spec.signature_name or "from_examples"
    # An explicit type stops TFMA from trying to load the model to guess it.
    spec.model_type = spec.model_type or tfma.TF_GENERIC
    if spec.model_type == tfma.TF_KERAS and not config.options.HasField("include_default_metrics"):
        # Keras default metrics are read from the loaded model while the graph is built.
        config.options.include_default_metrics.value = False
    if not config.metrics_specs:
        raise PipelineDefinitionError("eval_config has no metrics_specs: nothing to evaluate")
    tfma.utils.verify_eval_config(config)
    return config
