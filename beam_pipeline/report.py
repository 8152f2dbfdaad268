"""Static HTML views of what ML Metadata recorded: a report per run, a model's data and its metrics.

Every page is one self-contained file (graphs as inline SVG, plots as inline PNG, no scripts), so it
opens from disk or an artifact store's web view without a server or network access.
"""

from __future__ import annotations

import base64
import datetime
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import jinja2
import pandas as pd

from beam_pipeline import artifact_io, graph_drawing, lineage, queries
from beam_pipeline.artifacts import ANOMALIES, MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL, SCHEMA, STATISTICS
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.ui.paths import run_href

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
REPORT_FILE = "index.html"
UI_URL = "http://127.0.0.1:8080"  # where `beam-pipeline ui` listens by default


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.6g}"
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def cell(value: Any) -> dict[str, Any]:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"text": format_value(value), "num": numeric}


def table_data(frame: pd.DataFrame) -> dict[str, Any]:
    """Columns and formatted cells; numbers are flagged so the page right-aligns them."""
    return {"columns": list(frame.columns), "rows": [[cell(v) for v in row] for row in frame.itertuples(index=False)]}


def environment() -> jinja2.Environment:
    """Templates of the static pages and the metadata UI, autoescaped, with the `fmt` filter."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = format_value
    return env


def _render(template: str, out_path: str, **context: Any) -> str:
    html = (
        environment()
        .get_template(template)
        .render(generated=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), **context)
    )
    artifact_io.write_text_atomic(out_path, html)  # local or object store; a reader never sees half a page
    return out_path


# -- plots -------------------------------------------------------------------------------------------
def metrics_plot(frame: pd.DataFrame, slice_column: str) -> str:
    """A PNG (base64) with one bar chart per metric across the slice's values, example counts first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in frame.columns if c not in ("slice", "slice_value")]
    metrics.sort(key=lambda m: (m != "example_count", m))
    labels = [str(v) for v in frame["slice_value"]]
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(max(6.0, 0.35 * len(labels) + 2), 2.2 * len(metrics)), squeeze=False
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        ax.bar(labels, frame[metric].astype(float), color="#5c6bc0" if metric != "example_count" else "#90a4ae")
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel(slice_column)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _evaluation_view(evaluation_uri: str, slice_column: str | None) -> dict[str, Any]:
    """Overall metrics, and per slice column its table and plot."""
    result = queries.load_eval_result(evaluation_uri)
    everything = queries.metrics_frame(result)
    overall = everything[everything["slice"] == queries.OVERALL].drop(columns=["slice_value"])
    columns = sorted({k for key, _ in result.slicing_metrics for k, _ in key})
    if slice_column is not None:
        if slice_column not in columns:
            raise MetadataError(
                f"the evaluation has no slices by {slice_column!r}; sliced columns are {columns or 'none'}"
            )
        columns = [slice_column]
    slices = []
    for column in columns:
        frame = queries.metrics_frame(result, column)
        slices.append(
            {
                "column": column,
                "table": table_data(frame.drop(columns=["slice_value"])),
                "plot": metrics_plot(frame, column),
            }
        )
    return {"overall": table_data(overall), "slices": slices}


# -- the run report ----------------------------------------------------------------------------------
def dag_drawing(executions: pd.DataFrame) -> tuple[list[graph_drawing.Node], list[graph_drawing.Edge]]:
    """One box per component (id, type, state colour, duration), one edge per input channel from its producer."""
    produced_by = {aid: row.component_id for row in executions.itertuples() for aid in row.outputs.values()}
    nodes, edges = [], []
    for row in executions.itertuples():
        duration = "" if row.duration_s is None or pd.isna(row.duration_s) else f" · {row.duration_s:.1f}s"
        kind = [] if row.type == row.component_id else [row.type]
        nodes.append(
            graph_drawing.Node(
                row.component_id, row.component_id, (*kind, f"{row.state}{duration}"),
                fill=lineage.STATE_COLORS.get(row.state, "#eeeeee"),
                tooltip=f"{row.component_id} ({row.type}), execution #{row.id}: {row.state}",
            )
        )  # fmt: skip
    seen = set()
    for row in executions.itertuples():
        for name, ids in row.inputs.items():
            for producer in dict.fromkeys(produced_by[aid] for aid in ids if aid in produced_by):
                if (producer, row.component_id, name) not in seen:
                    seen.add((producer, row.component_id, name))
                    edges.append(graph_drawing.Edge(producer, row.component_id, name))
    return nodes, edges


def _dag_svg(executions: pd.DataFrame, title: str) -> str:
    return graph_drawing.svg(*dag_drawing(executions), title=title)


def run_report_context(store: MetadataStore | str, pipeline_name: str, run_id: str) -> dict[str, Any]:
    """Everything the run report shows, as plain data (tables as columns + formatted rows)."""
    store = queries.open_store(store)
    executions = queries.run_executions(store, pipeline_name, run_id)
    artifacts: dict[str, list[Any]] = {}
    for row in executions.itertuples():
        for artifact in store.get_artifacts(sorted(row.outputs.values())):
            artifacts.setdefault(artifact.type.name, []).append(artifact)

    statistics = [
        {
            "artifact": a,
            "splits": [
                (split, table_data(queries.statistics_frame(stats)))
                for split, stats in queries.read_statistics(a).items()
            ],
        }
        for a in artifacts.get(STATISTICS.name, [])
    ]
    schemas = [
        {"artifact": a, "table": table_data(queries.schema_frame(queries.read_schema(a)))}
        for a in artifacts.get(SCHEMA.name, [])
    ]
    anomalies = [
        {
            "artifact": a,
            "table": table_data(queries.anomalies_frame(queries.read_anomalies(a))),
            "splits": a.split_names,
        }
        for a in artifacts.get(ANOMALIES.name, [])
    ]
    evaluations = [{"artifact": a, **_evaluation_view(a.uri, None)} for a in artifacts.get(MODEL_EVALUATION.name, [])]
    blessings = [
        {
            "artifact": a,
            "blessed": bool(int(a.properties.get("blessed") or 0)),
            "model_uri": a.properties.get("model_uri"),
        }
        for a in artifacts.get(MODEL_BLESSING.name, [])
    ]
    pushes = [
        {
            "artifact": a,
            "pushed": bool(int(a.properties.get("pushed") or 0)),
            "destination": a.properties.get("pushed_destination"),
            "version": a.properties.get("pushed_version"),
            "message": a.properties.get("push_message"),
        }
        for a in artifacts.get(PUSHED_MODEL.name, [])
    ]
    states = list(executions["state"]) if not executions.empty else []
    components = executions[["component_id", "type", "state", "duration_s", "id", "start", "error"]].rename(
        columns={"id": "execution", "duration_s": "duration (s)"}
    )
    outputs = [
        ", ".join(f"{name} #{aid}" for name, aid in sorted(row.outputs.items())) for row in executions.itertuples()
    ]
    components.insert(5, "outputs", outputs)
    return {
        "pipeline_name": pipeline_name,
        "run_id": run_id,
        "ui_url": UI_URL + run_href(pipeline_name, run_id),
        "store_uri": store.uri,
        "state": queries.run_state(states),
        "start": executions["start"].min() if not executions.empty else None,
        "end": executions["end"].max() if not executions.empty else None,
        "dag_svg": _dag_svg(executions, f"{pipeline_name} run {run_id}") if not executions.empty else None,
        "components": table_data(components),
        "models": list(artifacts.get(MODEL.name, [])),
        "statistics": statistics,
        "schemas": schemas,
        "anomalies": anomalies,
        "evaluations": evaluations,
        "blessings": blessings,
        "pushes": pushes,
    }


def write_run_report(store: MetadataStore | str, pipeline_name: str, run_id: str, out_dir: str) -> str:
    """Write `<out_dir>/index.html` for one run; returns its path. The folder opens from disk as is."""
    context = run_report_context(store, pipeline_name, run_id)
    return _render("run_report.html.j2", artifact_io.join(out_dir, REPORT_FILE), **context)


# -- model pages -------------------------------------------------------------------------------------
_SIDE_BY_SIDE = ("count", "missing_pct", "mean", "std", "unique")


def _side_by_side(lhs: Any, rhs: Any) -> pd.DataFrame:
    left = queries.statistics_frame(lhs).set_index("feature")
    right = queries.statistics_frame(rhs).set_index("feature")
    drift = queries.statistics_diff(lhs, rhs).set_index("feature")[["mean_change_pct", "drift", "drift_measure"]]
    rows = []
    for feature in sorted(set(left.index) | set(right.index)):
        side = left if feature in left.index else right
        row: dict[str, Any] = {
            "feature": feature,
            "type": side["type"].get(feature),
            "mean change %": drift["mean_change_pct"].get(feature),
            "drift (TFDV)": drift["drift"].get(feature),
            "drift measure": drift["drift_measure"].get(feature),
        }
        for column in _SIDE_BY_SIDE:
            row[f"lhs {column}"] = left[column].get(feature) if feature in left.index else None
            row[f"rhs {column}"] = right[column].get(feature) if feature in right.index else None
        rows.append(row)
    return pd.DataFrame(rows)


def write_model_stats_html(store: MetadataStore | str, model_ids: Sequence[int], out_path: str) -> str:
    """Statistics of the data each model was trained on; for two models, side by side with drift."""
    if len(model_ids) not in (1, 2):
        raise MetadataError(f"model statistics compare one or two models, got {len(model_ids)}")
    store = queries.open_store(store)
    data = [queries.training_data(store, mid) for mid in model_ids]
    sections = []
    if len(data) == 1:
        for split, stats in data[0].stats.items():
            sections.append({"split": split, "table": table_data(queries.statistics_frame(stats))})
    else:
        lhs, rhs = data
        for split in [s for s in lhs.stats if s in rhs.stats]:
            sections.append({"split": split, "table": table_data(_side_by_side(lhs.stats[split], rhs.stats[split]))})
    return _render("model_stats.html.j2", out_path, models=data, sections=sections, store_uri=store.uri)


def write_model_metrics_html(store: MetadataStore | str, model_id: int, slice_column: str | None, out_path: str) -> str:
    """The model's evaluation: overall metrics, then a table and a plot per slice column (or the one named)."""
    store = queries.open_store(store)
    queries.get_artifact(store, model_id, MODEL.name)
    evaluation = queries.model_evaluation(store, model_id)
    if evaluation is None:
        raise MetadataError(f"model {model_id} was never evaluated: no Evaluator read it as its candidate model")
    view = _evaluation_view(evaluation.uri, slice_column)
    outcome = queries.model_outcome(store, model_id)
    return _render(
        "model_metrics.html.j2",
        out_path,
        model_id=model_id,
        evaluation=evaluation,
        outcome=outcome,
        store_uri=store.uri,
        **view,
    )
