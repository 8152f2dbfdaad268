"""Reading statistics, schema and anomalies artifacts, and their protos as one-row-per-feature DataFrames."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from beam_pipeline import artifact_io
from beam_pipeline.artifact_io import read_schema as read_schema  # re-exported: the queries API names it here
from beam_pipeline.artifacts import Artifact


def read_statistics(artifact: Artifact) -> dict[str, Any]:
    """Split name -> DatasetFeatureStatisticsList of an ExampleStatistics artifact."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    return {
        split: artifact_io.read_proto(
            artifact_io.split_file(artifact.uri, split, artifact_io.STATS_FILE),
            statistics_pb2.DatasetFeatureStatisticsList,
        )
        for split in artifact.split_names
    }


def read_anomalies(artifact: Artifact) -> dict[str, Any]:
    """Split name -> Anomalies proto of an ExampleAnomalies artifact."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    return {
        split: artifact_io.read_proto(
            artifact_io.split_file(artifact.uri, split, artifact_io.ANOMALIES_FILE), anomalies_pb2.Anomalies
        )
        for split in artifact.split_names
    }


def _numeric_summary(feature: Any) -> dict[str, Any]:
    num = feature.num_stats
    common = num.common_stats
    total = common.num_non_missing + common.num_missing
    median = None
    for q in num.histograms:
        if q.type == q.QUANTILES and q.buckets:
            median = q.buckets[len(q.buckets) // 2].low_value
    return {
        "count": common.num_non_missing,
        "missing_pct": 100.0 * common.num_missing / total if total else 0.0,
        "mean": num.mean,
        "std": num.std_dev,
        "min": num.min,
        "median": median,
        "max": num.max,
        "zeros_pct": 100.0 * num.num_zeros / common.num_non_missing if common.num_non_missing else 0.0,
        "unique": None,
        "top_value": None,
    }


def _string_summary(feature: Any) -> dict[str, Any]:
    s = feature.string_stats
    common = s.common_stats
    total = common.num_non_missing + common.num_missing
    top = s.top_values[0] if s.top_values else None
    return {
        "count": common.num_non_missing,
        "missing_pct": 100.0 * common.num_missing / total if total else 0.0,
        "mean": None,
        "std": None,
        "min": None,
        "median": None,
        "max": None,
        "zeros_pct": None,
        "unique": s.unique,
        "top_value": f"{top.value} ({int(top.frequency)})" if top else None,
    }


def feature_name(feature: Any) -> str:
    return feature.name or ".".join(feature.path.step)


def statistics_frame(stats: Any) -> pd.DataFrame:
    """One row per feature of a DatasetFeatureStatisticsList: the numbers a person scans first."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    rows = []
    for dataset in stats.datasets:
        for feature in dataset.features:
            kind = statistics_pb2.FeatureNameStatistics.Type.Name(feature.type)
            summary = _numeric_summary(feature) if feature.HasField("num_stats") else _string_summary(feature)
            rows.append({"feature": feature_name(feature), "type": kind, **summary})
    columns = [
        "feature",
        "type",
        "count",
        "missing_pct",
        "mean",
        "std",
        "min",
        "median",
        "max",
        "zeros_pct",
        "unique",
        "top_value",
    ]
    return pd.DataFrame(rows, columns=columns).sort_values("feature").reset_index(drop=True)


def schema_frame(schema: Any) -> pd.DataFrame:
    """One row per schema feature: type, presence, valency and domain."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    domains = {d.name: list(d.value) for d in schema.string_domain}
    rows = []
    for f in schema.feature:
        if f.HasField("domain"):
            domain = f"{f.domain} ({len(domains.get(f.domain, []))} values)"
        elif f.HasField("int_domain"):
            domain = f"int [{f.int_domain.min}, {f.int_domain.max}]" if f.int_domain.HasField("max") else "int"
        elif f.HasField("float_domain"):
            domain = "float"
        else:
            domain = ""
        if f.HasField("shape"):
            valency = "fixed " + "x".join(str(d.size) for d in f.shape.dim) if f.shape.dim else "scalar"
        elif f.HasField("value_count"):
            valency = f"{f.value_count.min}..{f.value_count.max}" if f.value_count.max else f">= {f.value_count.min}"
        else:
            valency = ""
        rows.append(
            {
                "feature": f.name,
                "type": schema_pb2.FeatureType.Name(f.type),
                "presence": "required" if f.presence.min_fraction == 1.0 else "optional",
                "valency": valency,
                "domain": domain,
            }
        )
    return pd.DataFrame(rows, columns=["feature", "type", "presence", "valency", "domain"])


def anomalies_frame(anomalies: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (split, feature) anomaly, plus dataset-level ones under feature '(dataset)'."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    rows = []
    for split, proto in anomalies.items():
        for name, info in sorted(proto.anomaly_info.items()):
            rows.append(
                {
                    "split": split,
                    "feature": name,
                    "severity": anomalies_pb2.AnomalyInfo.Severity.Name(info.severity),
                    "short_description": info.short_description,
                    "description": info.description,
                }
            )
        if proto.HasField("dataset_anomaly_info"):
            info = proto.dataset_anomaly_info
            rows.append(
                {
                    "split": split,
                    "feature": "(dataset)",
                    "severity": anomalies_pb2.AnomalyInfo.Severity.Name(info.severity),
                    "short_description": info.short_description,
                    "description": info.description,
                }
            )
    return pd.DataFrame(rows, columns=["split", "feature", "severity", "short_description", "description"])
