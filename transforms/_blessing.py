"""The Evaluator's blessing: TFMA's validation result turned into BLESSED/NOT_BLESSED, reasons and properties."""

from __future__ import annotations

import json
from typing import Any

import tensorflow_model_analysis as tfma
from google.protobuf import json_format
from tensorflow_model_analysis.proto import metrics_for_slice_pb2, validation_result_pb2

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import Artifact

BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
VALIDATION_FILE = "validation.json"


def _slice_name(slice_key: metrics_for_slice_pb2.SliceKey) -> str:
    return tfma.slicer.stringify_slice_key(tfma.slicer.deserialize_slice_key(slice_key))


def _describe_threshold(threshold: tfma.MetricThreshold) -> str:
    if threshold.HasField("value_threshold"):
        bounds = threshold.value_threshold
        parts = []
        if bounds.HasField("lower_bound"):
            parts.append(f">= {bounds.lower_bound.value:g}")
        if bounds.HasField("upper_bound"):
            parts.append(f"<= {bounds.upper_bound.value:g}")
        return "required " + " and ".join(parts)
    change = threshold.change_threshold
    op = "<=" if change.direction == tfma.MetricDirection.LOWER_IS_BETTER else ">="
    parts = []
    if change.HasField("absolute"):
        parts.append(f"change {op} {change.absolute.value:g}")
    if change.HasField("relative"):
        parts.append(f"relative change {op} {change.relative.value:g}")
    return "required " + " and ".join(parts)


def _metric_values(evaluation_uri: str) -> dict[tuple[bytes, bytes], float]:
    values = {}
    for per_slice in tfma.load_metrics(evaluation_uri):
        slice_bytes = per_slice.slice_key.SerializeToString(deterministic=True)
        for kv in per_slice.metric_keys_and_values:
            if kv.value.HasField("double_value"):
                values[slice_bytes, kv.key.SerializeToString(deterministic=True)] = kv.value.double_value.value
    return values


def _reasons(result: validation_result_pb2.ValidationResult, evaluation_uri: str) -> list[dict[str, Any]]:
    """One dict per failed check: slice, metric, value(s), threshold and a sentence saying it."""
    values = _metric_values(evaluation_uri) if result.metric_validations_per_slice else {}
    reasons = []
    for per_slice in result.metric_validations_per_slice:
        slice_name = _slice_name(per_slice.slice_key)
        slice_bytes = per_slice.slice_key.SerializeToString(deterministic=True)
        for failure in per_slice.failures:
            key = failure.metric_key
            value_key = metrics_for_slice_pb2.MetricKey()
            value_key.CopyFrom(key)
            value_key.ClearField("is_diff")
            candidate = values.get((slice_bytes, value_key.SerializeToString(deterministic=True)))
            reason: dict[str, Any] = {
                "slice": slice_name,
                "metric": key.name,
                "value": candidate,
                "threshold": json_format.MessageToDict(failure.metric_threshold),
            }
            threshold_text = _describe_threshold(failure.metric_threshold)
            if failure.message == "Metric not found.":
                text = f"{key.name} on slice {slice_name}: not computed; {threshold_text}"
            elif key.is_diff:
                value_key.model_name = tfma.BASELINE_KEY
                baseline = values.get((slice_bytes, value_key.SerializeToString(deterministic=True)))
                change = failure.metric_value.double_value.value
                reason.update(baseline_value=baseline, change=change)
                text = (
                    f"{key.name} on slice {slice_name}: {_fmt(candidate)} vs baseline {_fmt(baseline)} "
                    f"(change {change:+.4g}); {threshold_text}"
                )
            else:
                value = failure.metric_value.double_value.value
                reason["value"] = value
                text = f"{key.name} on slice {slice_name}: {value:.4g}; {threshold_text}"
            reason["message"] = text
            reasons.append(reason)
    for spec in result.missing_slices:
        spec_text = json.dumps(json_format.MessageToDict(spec)) if spec.ByteSize() else "Overall"
        text = f"slice {spec_text} has no examples, so its thresholds were not checked"
        reasons.append({"slice": spec_text, "message": text})
    return reasons


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class Judge:
    """Turn TFMA's validation result into the blessing files and properties."""

    def __init__(self, *, evaluation_uri: str, blessing_uri: str, baseline_uri: str | None, has_thresholds: bool):
        self.evaluation_uri = evaluation_uri
        self.blessing_uri = blessing_uri
        self.baseline_uri = baseline_uri
        self.has_thresholds = has_thresholds

    def __call__(self, _files_written: int, model: Artifact) -> dict[str, Any]:
        result = tfma.load_validation_result(self.evaluation_uri)
        reasons = _reasons(result, self.evaluation_uri)
        blessed = bool(result.validation_ok) and self.has_thresholds
        if not self.has_thresholds:
            reasons.append({"message": "eval_config has no thresholds: a model is only blessed against thresholds"})
        if blessed:
            summary = "blessed: every threshold is met"
            if self.baseline_uri is None:
                summary += " (no blessed baseline yet: change thresholds were not applied)"
            else:
                summary += f" (baseline {self.baseline_uri})"
        else:
            summary = f"not blessed: {len(reasons)} check(s) failed: " + "; ".join(r["message"] for r in reasons[:5])
            if len(reasons) > 5:
                summary += f"; and {len(reasons) - 5} more (see {VALIDATION_FILE})"
        report = {
            "blessed": blessed,
            "summary": summary,
            "reasons": reasons,
            "model_uri": model.uri,
            "baseline_model_uri": self.baseline_uri,
            "rubber_stamp": bool(result.rubber_stamp),
            "validation_ok": bool(result.validation_ok),
        }
        marker = BLESSED_FILE if blessed else NOT_BLESSED_FILE
        artifact_io.write_text(
            artifact_io.join(self.blessing_uri, marker), "\n".join([summary, *(r["message"] for r in reasons)]) + "\n"
        )
        artifact_io.write_text(
            artifact_io.join(self.blessing_uri, VALIDATION_FILE), json.dumps(report, indent=2, sort_keys=True)
        )
        properties = {"blessed": int(blessed), "model_uri": model.uri, "blessing_message": summary}
        if self.baseline_uri:
            properties["baseline_model_uri"] = self.baseline_uri
        return properties
