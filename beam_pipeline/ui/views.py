"""What each page of the metadata UI shows, read from ML Metadata as plain data for its template."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from beam_pipeline import graph_drawing, lineage, queries, report
from beam_pipeline.artifacts import ANOMALIES, MODEL, MODEL_BLESSING, SCHEMA, STATISTICS
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.ui import charts
from beam_pipeline.ui.paths import run_href

TOP_VALUES = 12  # bars per categorical feature


def _links(ids: dict[str, Any]) -> list[dict[str, Any]]:
    """An execution's inputs or outputs ({name: id or [ids]}) as (name, id) links."""
    out = []
    for name, value in sorted(ids.items()):
        for artifact_id in value if isinstance(value, list) else [value]:
            out.append({"name": name, "id": int(artifact_id)})
    return out


def runs_page(store: MetadataStore, pipeline: str | None, state: str | None) -> dict[str, Any]:
    everything = queries.runs(store)
    shown = everything
    if pipeline:
        shown = shown[shown["pipeline"] == pipeline]
    if state:
        shown = shown[shown["state"] == state]
    rows = [
        {**{k: report.format_value(v) for k, v in row._asdict().items()}, "href": run_href(row.pipeline, row.run_id)}
        for row in shown.itertuples(index=False)
    ]
    return {
        "rows": rows,
        "pipelines": sorted(set(everything["pipeline"])),
        "states": sorted(set(everything["state"])),
        "pipeline": pipeline or "",
        "state": state or "",
        "total": len(everything),
    }


def run_page(store: MetadataStore, pipeline: str, run_id: str) -> dict[str, Any]:
    executions = queries.run_executions(store, pipeline, run_id)
    nodes, edges = report.dag_drawing(executions)
    ids = dict(zip(executions["component_id"], executions["id"], strict=True))
    nodes = [dataclasses.replace(n, href=f"/executions/{ids[n.key]}") for n in nodes]
    rows = [
        {
            "id": int(row.id),
            "component": row.component_id,
            "type": row.type,
            "state": row.state,
            "duration": report.format_value(row.duration_s),
            "outputs": _links(row.outputs),
            "error": row.error or "",
        }
        for row in executions.itertuples(index=False)
    ]
    summary = queries.runs(store, pipeline)
    summary = summary[summary["run_id"] == run_id]
    state = summary["state"].iloc[0] if len(summary) else "?"
    return {
        "pipeline": pipeline,
        "run_id": run_id,
        "state": state,
        "dag": graph_drawing.svg(nodes, edges, title=f"{pipeline} run {run_id}"),
        "rows": rows,
    }


def execution_page(store: MetadataStore, execution_id: int) -> dict[str, Any]:
    found = store.mlmd.get_executions_by_id([execution_id])
    if not found:
        raise MetadataError(f"no execution {execution_id} in {store.uri}")
    e = found[0]
    frame = queries.executions(store, e.type)
    row = frame[frame["id"] == execution_id].iloc[0].to_dict()
    fixed = set(queries.EXECUTION_COLUMNS)
    config = [{"key": k, "value": report.format_value(v)} for k, v in row.items() if k not in fixed]
    return {
        "id": execution_id,
        "type": e.type,
        "component": row["component_id"],
        "pipeline": row["pipeline"],
        "run_id": row["run_id"],
        "run_href": run_href(row["pipeline"], row["run_id"]),
        "state": row["state"],
        "start": report.format_value(row["start"]),
        "end": report.format_value(row["end"]),
        "duration": report.format_value(row["duration_s"]),
        "inputs": _links(row["inputs"]),
        "outputs": _links(row["outputs"]),
        "error": row["error"] or "",
        "config": config,
    }


def executions_page(store: MetadataStore, component_type: str) -> dict[str, Any]:
    frame = queries.executions(store, component_type)
    drop = ["type", "inputs", "outputs", "end"]
    shown = frame.drop(columns=[c for c in drop if c in frame.columns]).sort_values("id", ascending=False)
    return {
        "type": component_type,
        "columns": list(shown.columns),
        "rows": [[report.cell(v) for v in r] for r in shown.itertuples(index=False)],
        "types": sorted(t.name for t in store.mlmd.get_execution_types()),
    }


def artifact_page(store: MetadataStore, artifact_id: int, hops: int, direction: str) -> dict[str, Any]:
    artifact = queries.get_artifact(store, artifact_id)
    graph = lineage.lineage(store, artifact_id, num_hops=hops, direction=direction)
    nodes, edges = graph.drawing()
    nodes = [
        dataclasses.replace(
            n, href=("/artifacts/" if n.key.startswith("artifact:") else "/executions/") + n.key.split(":", 1)[1]
        )
        for n in nodes
    ]
    page: dict[str, Any] = {
        "id": artifact_id,
        "type": artifact.type.name,
        "uri": artifact.uri,
        "properties": [{"key": k, "value": report.format_value(v)} for k, v in sorted(artifact.properties.items())],
        "lineage": graph_drawing.svg(nodes, edges, title=f"lineage of artifact {artifact_id}"),
        "hops": hops,
        "direction": direction,
        "producers": [
            {"id": e.id, "name": queries.prop_value(e, "component_id")} for e in queries.producers(store, artifact_id)
        ],
        "anomalies": None,
        "schema": None,
    }
    if artifact.type.name == ANOMALIES.name:
        page["anomalies"] = report.table_data(queries.anomalies_frame(queries.read_anomalies(artifact)))
    if artifact.type.name == SCHEMA.name:
        page["schema"] = report.table_data(queries.schema_frame(queries.read_schema(artifact)))
    return page


def _feature_charts(name: str, kind: str, by_dataset: dict[str, Any]) -> str:
    """A histogram (numeric) or top-values bars (categorical) of one feature, one series per dataset."""
    if kind in ("INT", "FLOAT"):
        series = {}
        for label, feature in by_dataset.items():
            standard = [h for h in feature.num_stats.histograms if h.type == h.STANDARD]
            if standard:
                series[label] = [(b.low_value, b.high_value, b.sample_count) for b in standard[0].buckets]
        return charts.histogram(series, title=name)
    counts: dict[str, dict[str, float]] = {}
    for label, feature in by_dataset.items():
        counts[label] = {v.value: v.frequency for v in feature.string_stats.top_values}
    first = next(iter(counts.values()), {})
    values = sorted(first, key=lambda v: -first[v])[:TOP_VALUES]
    for other in list(counts.values())[1:]:  # the other dataset's top values too, if they differ
        values += [v for v in sorted(other, key=lambda v: -other[v])[:3] if v not in values]
    return charts.bar_chart(values, {label: [c.get(v, 0.0) for v in values] for label, c in counts.items()}, title=name)


def statistics_page(
    store: MetadataStore, artifact_id: int, split: str | None, compare: int | None, compare_split: str | None
) -> dict[str, Any]:
    """Per feature the numbers TFDV computed and a chart; another split (`compare_split`, e.g. eval over
    train) or another statistics artifact (`compare`, e.g. model B's data) overlaid."""
    artifact = queries.get_artifact(store, artifact_id, STATISTICS.name)
    split = split or (artifact.split_names[0] if artifact.split_names else None)
    sides = [(artifact, split)]
    if compare is not None or compare_split:
        other = queries.get_artifact(store, compare, STATISTICS.name) if compare is not None else artifact
        other_split = compare_split or (split if split in other.split_names else other.split_names[0])
        sides.append((other, other_split))
    datasets = {}
    for a, s in sides:
        stats = queries.read_statistics(a)
        if s not in stats:
            raise MetadataError(f"statistics {a.id} have no split {s!r}; splits are {sorted(stats)}")
        datasets[f"#{a.id} {s}" if len(sides) > 1 else s] = stats[s]
    first_label = next(iter(datasets))
    frame = queries.statistics_frame(datasets[first_label])
    features = {}
    for label, stats in datasets.items():
        for feature in stats.datasets[0].features:
            features.setdefault(queries.feature_name(feature), {})[label] = feature
    rows = []
    for rec in frame.to_dict("records"):
        kind = rec["type"]
        by_dataset = features.get(rec["feature"], {})
        rows.append(
            {
                "feature": rec["feature"],
                "type": kind,
                "numbers": [
                    {"key": k, "value": report.format_value(v)}
                    for k, v in rec.items()
                    if k not in ("feature", "type") and report.format_value(v)
                ],
                "chart": _feature_charts(rec["feature"], kind, by_dataset),
            }
        )
    others = [
        {"id": a.id, "label": f"#{a.id} ({a.properties.get('producer_component', '')})"}
        for a in store.latest_artifacts(STATISTICS.name, artifact.properties.get("pipeline_name", ""))
        if a.id != artifact_id
    ]
    num = {label: int(s.datasets[0].num_examples) for label, s in datasets.items()}
    return {
        "id": artifact_id,
        "split": split,
        "splits": artifact.split_names,
        "compare": compare,
        "compare_split": compare_split or "",
        "others": others,
        "examples": num,
        "rows": rows,
    }


def model_page(store: MetadataStore, model_id: int, slice_column: str | None) -> dict[str, Any]:
    model = queries.get_artifact(store, model_id, MODEL.name)
    outcome = queries.model_outcome(store, model_id)
    blessing = (
        queries.get_artifact(store, outcome["blessing_id"], MODEL_BLESSING.name) if outcome["blessing_id"] else None
    )
    evaluation = queries.model_evaluation(store, model_id)
    metrics, columns, sliced = None, [], None
    if evaluation is not None:
        result = queries.load_eval_result(evaluation.uri)
        columns = sorted({k for key, _ in result.slicing_metrics for k, _ in key})
        overall = queries.metrics_frame(result)
        metrics = report.table_data(overall[overall["slice"] == queries.OVERALL].drop(columns=["slice_value"]))
        slice_column = slice_column or (columns[0] if columns else None)
        if slice_column:
            if slice_column not in columns:
                raise MetadataError(f"the evaluation has no slices by {slice_column!r}; sliced columns are {columns}")
            frame = queries.metrics_frame(result, slice_column)
            labels = [str(v) for v in frame["slice_value"]]
            names = [c for c in frame.columns if c not in ("slice", "slice_value")]
            names.sort(key=lambda m: (m != "example_count", m))
            sliced = {
                "column": slice_column,
                "charts": [
                    charts.bar_chart(labels, {name: [_num(v) for v in frame[name]]}, title=f"{name} by {slice_column}")
                    for name in names
                ],
                "table": report.table_data(frame.drop(columns=["slice"])),
            }
    others = [
        {"id": m.id, "label": f"#{m.id}"}
        for m in store.latest_artifacts(MODEL.name, model.properties.get("pipeline_name", ""))
        if m.id != model_id
    ]
    producer = queries.producers(store, model_id)
    return {
        "id": model_id,
        "uri": model.uri,
        "properties": [{"key": k, "value": report.format_value(v)} for k, v in sorted(model.properties.items())],
        "producer": {"id": producer[0].id, "name": queries.prop_value(producer[0], "component_id")}
        if producer
        else None,
        "outcome": outcome,
        "blessing": blessing.properties if blessing else None,
        "evaluation_id": evaluation.id if evaluation else None,
        "metrics": metrics,
        "slice_columns": columns,
        "sliced": sliced,
        "others": others,
    }


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if pd.isna(out) else out


def compare_page(store: MetadataStore, lhs: int, rhs: int) -> dict[str, Any]:
    found = queries.diff(store, lhs, rhs)
    sections = [
        ("Data", found.data),
        ("Schema", found.schema),
        ("Statistics and drift", found.statistics),
        ("Configuration", found.config),
        ("Metrics", found.metrics),
    ]
    return {
        "lhs": lhs,
        "rhs": rhs,
        "sections": [{"title": t, "table": report.table_data(f), "empty": f.empty} for t, f in sections],
        "code": sorted(found.code.items()),
    }
