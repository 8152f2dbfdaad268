"""A model's TFMA evaluation metrics as a DataFrame, one row per slice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from beam_pipeline._mlmd_reading import get_artifact, open_store
from beam_pipeline.artifacts import MODEL
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.model_lookup import model_evaluation

# -- evaluation metrics ------------------------------------------------------------------------------
OVERALL = "Overall"


def _metric_value(value: Mapping[str, Any]) -> float | None:
    if "doubleValue" in value:
        return float(value["doubleValue"])
    bounded = value.get("boundedValue")
    if isinstance(bounded, Mapping) and "value" in bounded:
        return float(bounded["value"])
    return None


def _slice_name(slice_key: tuple) -> str:
    return " & ".join(f"{k}={v}" for k, v in slice_key) if slice_key else OVERALL


def load_eval_result(uri: str) -> Any:
    """tfma.load_eval_result, choosing the candidate's metrics when a baseline was evaluated too."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(uri)
    specs = list(result.config.model_specs) if result.config else []
    if len(specs) > 1:
        candidate = next(s.name for s in specs if not s.is_baseline)
        result = tfma.load_eval_result(uri, model_name=candidate)
    return result


def metrics_frame(eval_result: Any, slice_column: str | None = None) -> pd.DataFrame:
    """Rows: slices (all, or those of one column sorted by value); columns: slice, slice_value, metrics."""
    rows = []
    columns_seen: set[str] = set()
    for slice_key, by_output in eval_result.slicing_metrics:
        columns_seen.update(k for k, _ in slice_key)
        if slice_column is not None and [k for k, _ in slice_key] != [slice_column]:
            continue
        row: dict[str, Any] = {"slice": _slice_name(slice_key), "slice_value": slice_key[0][1] if slice_key else None}
        prefixes = len(by_output) > 1 or any(len(sub) > 1 for sub in by_output.values())
        for output_name, by_sub_key in by_output.items():
            for sub_key, metrics in by_sub_key.items():
                for name, value in metrics.items():
                    number = _metric_value(value)
                    if number is None:
                        continue
                    label = "/".join(p for p in (output_name, sub_key, name) if p) if prefixes else name
                    row[label] = number
        rows.append(row)
    if slice_column is not None and not rows:
        raise MetadataError(
            f"the evaluation has no slices by {slice_column!r}; sliced columns are {sorted(columns_seen) or 'none'}"
        )
    frame = pd.DataFrame(rows)
    frame["slice_value"] = pd.Series([r["slice_value"] for r in rows], dtype=object)
    order = sorted(
        range(len(rows)),
        key=lambda i: (rows[i]["slice"] != OVERALL, _slice_order(rows[i]["slice"], rows[i]["slice_value"])),
    )
    return frame.iloc[order].reset_index(drop=True)


def _slice_order(name: str, value: Any) -> tuple:
    column = name.split("=", 1)[0]
    return (column, *_sortable(value))


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def model_metrics(store: MetadataStore | str, model_id: int, slice_column: str | None = None) -> pd.DataFrame:
    """The model's TFMA metrics per slice (of `slice_column` if given) as a DataFrame."""
    store = open_store(store)
    get_artifact(store, model_id, MODEL.name)
    evaluation = model_evaluation(store, model_id)
    if evaluation is None:
        raise MetadataError(f"model {model_id} was never evaluated: no Evaluator read it as its candidate model")
    return metrics_frame(load_eval_result(evaluation.uri), slice_column)
