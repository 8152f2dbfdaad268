"""The diff of two models' lineages: data, schema, statistics drift, user code, configuration and metrics."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any

import pandas as pd
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import artifact_io
from beam_pipeline._mlmd_reading import _outputs_of, execution_config, flatten, get_artifact, open_store, prop_value
from beam_pipeline.artifacts import EXAMPLES, MODEL, SCHEMA, Artifact
from beam_pipeline.data_tables import feature_name, read_schema
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.metric_tables import OVERALL, load_eval_result, metrics_frame
from beam_pipeline.model_lookup import model_evaluation, training_data, upstream


# -- diff of two models ------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelDiff:
    """What differs between the lineages of two models, section by section (empty = no difference)."""

    lhs: int
    rhs: int
    data: pd.DataFrame
    schema: pd.DataFrame
    statistics: pd.DataFrame
    code: dict[str, str]
    config: pd.DataFrame
    metrics: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(frame.to_json(orient="records"))

        return {
            "lhs": self.lhs,
            "rhs": self.rhs,
            "data": records(self.data),
            "schema": records(self.schema),
            "statistics": records(self.statistics),
            "code": self.code,
            "config": records(self.config),
            "metrics": records(self.metrics),
        }


def _by_component(executions_found: list[mlmd_pb2.Execution]) -> dict[str, mlmd_pb2.Execution]:
    out: dict[str, mlmd_pb2.Execution] = {}
    for e in executions_found:
        out.setdefault(prop_value(e, "component_id") or e.type, e)
    return out


def _data_diff(lhs: list[Artifact], rhs: list[Artifact]) -> pd.DataFrame:
    def keyed(artifacts: list[Artifact]) -> dict[str, Artifact]:
        nearest: dict[str, Artifact] = {}
        for a in artifacts:
            if a.type.name == EXAMPLES.name:
                nearest.setdefault(str(a.properties.get("producer_component", "?")), a)
        return nearest

    left, right = keyed(lhs), keyed(rhs)
    rows = []
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key), right.get(key)
        fa = a.properties.get("fingerprint") if a else None
        fb = b.properties.get("fingerprint") if b else None
        rows.append(
            {
                "examples": key,
                "lhs_id": a.id if a else None,
                "rhs_id": b.id if b else None,
                "lhs_fingerprint": fa,
                "rhs_fingerprint": fb,
                "lhs_rows": json.dumps(a.properties.get("row_counts"), sort_keys=True) if a else None,
                "rhs_rows": json.dumps(b.properties.get("row_counts"), sort_keys=True) if b else None,
                "same": a is not None and b is not None and (a.id == b.id or (fa is not None and fa == fb)),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["examples", "lhs_id", "rhs_id", "lhs_fingerprint", "rhs_fingerprint", "lhs_rows", "rhs_rows", "same"],
    )


def _schema_diff(lhs: Artifact | None, rhs: Artifact | None) -> pd.DataFrame:
    from tensorflow_metadata.proto.v0 import schema_pb2

    columns = ["feature", "change", "lhs", "rhs"]
    if lhs is None or rhs is None or lhs.id == rhs.id:
        return pd.DataFrame([], columns=columns)
    left = {f.name: f for f in read_schema(lhs).feature}
    right = {f.name: f for f in read_schema(rhs).feature}
    rows = []
    for name in sorted(set(left) | set(right)):
        a, b = left.get(name), right.get(name)
        if a is None:
            rows.append({"feature": name, "change": "added", "lhs": None, "rhs": schema_pb2.FeatureType.Name(b.type)})
        elif b is None:
            rows.append({"feature": name, "change": "removed", "lhs": schema_pb2.FeatureType.Name(a.type), "rhs": None})
        elif a.type != b.type:
            rows.append(
                {
                    "feature": name,
                    "change": "type changed",
                    "lhs": schema_pb2.FeatureType.Name(a.type),
                    "rhs": schema_pb2.FeatureType.Name(b.type),
                }
            )
        elif a.presence.min_fraction != b.presence.min_fraction or a.domain != b.domain:
            rows.append(
                {"feature": name, "change": "constraints changed", "lhs": str(a).strip(), "rhs": str(b).strip()}
            )
    return pd.DataFrame(rows, columns=columns)


STATISTICS_DIFF_COLUMNS = (
    "feature",
    "kind",
    "lhs_mean",
    "rhs_mean",
    "mean_change_pct",
    "lhs_std",
    "rhs_std",
    "lhs_unique",
    "rhs_unique",
    "drift",
    "drift_measure",
)
_MEASURES = {"L_INFTY": "L-infinity", "JENSEN_SHANNON_DIVERGENCE": "Jensen-Shannon"}


def drift(lhs_stats: Any, rhs_stats: Any) -> dict[str, tuple[str, float]]:
    """TFDV's own drift measurement of each feature from `lhs_stats` to `rhs_stats`: name → (measure, value).

    What ExampleValidator's drift comparators compute: L-infinity distance for categorical features,
    Jensen-Shannon divergence for numeric ones; from the whole-split dataset of each side.
    """
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import anomalies_pb2, statistics_pb2

    def whole(stats: Any) -> Any:
        return statistics_pb2.DatasetFeatureStatisticsList(datasets=[stats.datasets[0]])

    lhs, rhs = whole(lhs_stats), whole(rhs_stats)
    schema = tfdv.infer_schema(lhs)
    categorical = {feature_name(f) for f in lhs.datasets[0].features if f.HasField("string_stats")}
    numeric = {feature_name(f) for f in lhs.datasets[0].features if f.num_stats.histograms}
    for feature in schema.feature:
        if feature.name in categorical:
            feature.drift_comparator.infinity_norm.threshold = 1.0  # the largest value: measured, never flagged
        elif feature.name in numeric:
            feature.drift_comparator.jensen_shannon_divergence.threshold = 1.0
    anomalies = tfdv.validate_statistics(rhs, schema, previous_statistics=lhs)
    out = {}
    for info in anomalies.drift_skew_info:
        for m in info.drift_measurements:
            kind = anomalies_pb2.DriftSkewInfo.Measurement.Type.Name(m.type)
            out[".".join(info.path.step)] = (_MEASURES.get(kind, kind), m.value)
    return out


def statistics_diff(lhs_stats: Any, rhs_stats: Any) -> pd.DataFrame:
    """Per feature: mean/std change for numbers, unique-count change for categories, and TFDV's drift."""

    def features(stats: Any) -> dict[str, Any]:
        return {feature_name(f): f for d in stats.datasets[:1] for f in d.features}

    left, right = features(lhs_stats), features(rhs_stats)
    measured = drift(lhs_stats, rhs_stats) if left and right else {}
    rows = []
    for name in sorted(set(left) & set(right)):
        a, b = left[name], right[name]
        measure, value = measured.get(name, (None, None))
        row = dict.fromkeys(STATISTICS_DIFF_COLUMNS)
        row.update(feature=name, drift=value, drift_measure=measure)
        if a.HasField("num_stats") and b.HasField("num_stats"):
            change = b.num_stats.mean - a.num_stats.mean
            scale = abs(a.num_stats.mean) or 1.0
            row.update(
                kind="numeric",
                lhs_mean=a.num_stats.mean,
                rhs_mean=b.num_stats.mean,
                mean_change_pct=100.0 * change / scale,
                lhs_std=a.num_stats.std_dev,
                rhs_std=b.num_stats.std_dev,
            )
        elif a.HasField("string_stats") and b.HasField("string_stats"):
            row.update(kind="categorical", lhs_unique=a.string_stats.unique, rhs_unique=b.string_stats.unique)
        else:
            continue
        rows.append(row)
    return pd.DataFrame(rows, columns=list(STATISTICS_DIFF_COLUMNS))


def module_source(store: MetadataStore, execution: mlmd_pb2.Execution, key: str) -> tuple[str | None, str]:
    """(text, where it came from) of a user module: the copy staged at launch, which is what the
    execution ran; for runs recorded before staging, a copy in its outputs, else the path now."""
    from apache_beam.io.filesystems import FileSystems

    path = execution_config(execution).get(key)
    if not path:
        return None, "not configured"
    staged = json.loads(prop_value(execution, "staged_modules") or "{}").get(key)
    if staged:
        if not FileSystems.exists(staged):
            return None, f"the copy staged at launch, {staged}, no longer exists"
        return artifact_io.read_bytes(staged).decode(errors="replace"), f"{path} as staged at launch: {staged}"
    name = os.path.basename(path)
    for artifact in _outputs_of(store, execution.id).values():
        patterns = [artifact_io.join(artifact.uri, name), artifact_io.join(artifact.uri, "**", name)]
        matches = sorted({m.path for found in FileSystems.match(patterns) for m in found.metadata_list})
        if matches:
            copy = matches[0]
            return artifact_io.read_bytes(copy).decode(
                errors="replace"
            ), f"copy stored in artifact {artifact.id}: {copy}"
    if FileSystems.exists(path):
        return artifact_io.read_bytes(path).decode(
            errors="replace"
        ), f"{path} (as it is now; no copy was stored with the run)"
    return None, f"{path} no longer exists and no copy was stored with the run"


def _code_diff(
    store: MetadataStore, left: dict[str, mlmd_pb2.Execution], right: dict[str, mlmd_pb2.Execution]
) -> dict[str, str]:
    diffs = {}
    for component in sorted(set(left) & set(right)):
        keys = {
            k for e in (left[component], right[component]) for k in execution_config(e) if k.endswith("module_file")
        }
        for key in sorted(keys):
            a_text, a_from = module_source(store, left[component], key)
            b_text, b_from = module_source(store, right[component], key)
            if a_text == b_text:
                continue
            lines = difflib.unified_diff(
                (a_text or "").splitlines(keepends=True),
                (b_text or "").splitlines(keepends=True),
                fromfile=f"lhs {component}.{key}: {a_from}",
                tofile=f"rhs {component}.{key}: {b_from}",
            )
            diffs[f"{component}.{key}"] = "".join(lines)
    return diffs


def _config_diff(left: dict[str, mlmd_pb2.Execution], right: dict[str, mlmd_pb2.Execution]) -> pd.DataFrame:
    rows = []
    for component in sorted(set(left) | set(right)):
        a = flatten(execution_config(left[component])) if component in left else {}
        b = flatten(execution_config(right[component])) if component in right else {}
        if component not in left or component not in right:
            rows.append(
                {
                    "component": component,
                    "key": "(component)",
                    "lhs": "present" if component in left else "absent",
                    "rhs": "present" if component in right else "absent",
                }
            )
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                rows.append(
                    {"component": component, "key": key, "lhs": json.dumps(a.get(key)), "rhs": json.dumps(b.get(key))}
                )
    return pd.DataFrame(rows, columns=["component", "key", "lhs", "rhs"])


def _metrics_diff(store: MetadataStore, lhs: int, rhs: int) -> pd.DataFrame:
    def overall(model_id: int) -> dict[str, float]:
        evaluation = model_evaluation(store, model_id)
        if evaluation is None:
            return {}
        frame = metrics_frame(load_eval_result(evaluation.uri))
        top = frame[frame["slice"] == OVERALL]
        return {} if top.empty else {k: v for k, v in top.iloc[0].items() if k not in ("slice", "slice_value")}

    a, b = overall(lhs), overall(rhs)
    rows = [
        {
            "metric": name,
            "lhs": a.get(name),
            "rhs": b.get(name),
            "change": (b[name] - a[name]) if name in a and name in b else None,
        }
        for name in sorted(set(a) | set(b))
    ]
    return pd.DataFrame(rows, columns=["metric", "lhs", "rhs", "change"])


def diff(store: MetadataStore | str, lhs: int, rhs: int) -> ModelDiff:
    """Compare two models' lineages: data, schema, statistics drift, user code, configuration and metrics."""
    store = open_store(store)
    for model_id in (lhs, rhs):
        get_artifact(store, model_id, MODEL.name)
    left_execs, left_artifacts = upstream(store, lhs)
    right_execs, right_artifacts = upstream(store, rhs)
    left, right = _by_component(left_execs), _by_component(right_execs)

    def first(artifacts: list[Artifact], type_name: str) -> Artifact | None:
        return next((a for a in artifacts if a.type.name == type_name), None)

    stats_rows = []
    try:
        left_data, right_data = training_data(store, lhs), training_data(store, rhs)
    except MetadataError:
        left_data = right_data = None
    if left_data and right_data and left_data.statistics.id != right_data.statistics.id:
        for split in [s for s in left_data.stats if s in right_data.stats]:
            frame = statistics_diff(left_data.stats[split], right_data.stats[split])
            frame.insert(0, "split", split)
            stats_rows.append(frame)
    if stats_rows:
        statistics = pd.concat(stats_rows, ignore_index=True)
    else:
        statistics = pd.DataFrame([], columns=["split", *STATISTICS_DIFF_COLUMNS])
    return ModelDiff(
        lhs=lhs,
        rhs=rhs,
        data=_data_diff(left_artifacts, right_artifacts),
        schema=_schema_diff(first(left_artifacts, SCHEMA.name), first(right_artifacts, SCHEMA.name)),
        statistics=statistics,
        code=_code_diff(store, left, right),
        config=_config_diff(left, right),
        metrics=_metrics_diff(store, lhs, rhs),
    )
