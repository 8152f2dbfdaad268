"""`beam-pipeline` subcommands that read ML Metadata: runs, executions, lineage, model views, diff, report.

`beam_pipeline.cli` adds every command in `commands` to its group. Each reads the store named by
--metadata-uri (or BEAM_PIPELINE_METADATA_URI), else `<--pipeline-root>/metadata.sqlite`.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click
import pandas as pd

from beam_pipeline.errors import BeamPipelineError


def _store_options(fn: Callable) -> Callable:
    @click.option(
        "--metadata-uri",
        envvar="BEAM_PIPELINE_METADATA_URI",
        default=None,
        help="ML Metadata store: a SQLite path or mysql://user:pw@host:port/db.",
    )
    @click.option("--pipeline-root", default=None, help="Read <pipeline root>/metadata.sqlite.")
    @functools.wraps(fn)
    def wrapper(*args: Any, metadata_uri: str | None, pipeline_root: str | None, **kwargs: Any) -> Any:
        from beam_pipeline import cli, queries, remote_fs

        cli._quiet_libraries()
        try:
            # Where pages and images go may be an object store too (artifacts are reached as they are read).
            remote_fs.enable_for([kwargs.get("out") or "", kwargs.get("out_dir") or ""])
            return fn(*args, store=queries.open_store(queries.store_uri(metadata_uri, pipeline_root)), **kwargs)
        except BeamPipelineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Print a table, CSV or JSON records.",
)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_frame(frame: pd.DataFrame, fmt: str, title: str) -> None:
    """Print a DataFrame as a rich table, CSV or JSON records (dicts/lists stay structured in JSON)."""
    if fmt == "json":
        click.echo(frame.to_json(orient="records", date_format="iso", indent=2))
        return
    if fmt == "csv":
        flat = frame.copy()
        for column in flat.columns:
            if flat[column].map(lambda v: isinstance(v, (dict, list))).any():
                flat[column] = flat[column].map(json.dumps)
        click.echo(flat.to_csv(index=False), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    rows = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    table = Table(title=title, show_lines=False)
    widths = []
    for i, column in enumerate(frame.columns):
        table.add_column(str(column), overflow="fold")
        widths.append(max([len(str(column))] + [min(len(r[i]), 60) for r in rows]) + 3)
    for row in rows:
        table.add_row(*row)
    # Wide enough that ids and timestamps stay on one line; long values fold.
    Console(width=max(120, min(sum(widths) + 1, 400))).print(table)


@click.command()
@_store_options
@click.option("--pipeline", "pipeline_name", default=None, help="Only runs of this pipeline.")
@_format_option
def runs(store: Any, pipeline_name: str | None, fmt: str) -> None:
    """List pipeline runs, newest first, with state and duration."""
    from beam_pipeline import queries

    _print_frame(queries.runs(store, pipeline_name), fmt, "pipeline runs")


@click.command()
@_store_options
@click.argument("component_type")
@click.option("--pipeline", "pipeline_name", default=None, help="Only executions of this pipeline.")
@click.option("--run", "run_id", default=None, help="Only executions of this run id.")
@_format_option
def executions(store: Any, component_type: str, pipeline_name: str | None, run_id: str | None, fmt: str) -> None:
    """List every execution of COMPONENT_TYPE (e.g. Trainer) with its configuration and artifacts."""
    from beam_pipeline import queries

    frame = queries.executions(store, component_type, pipeline_name=pipeline_name, run_id=run_id)
    _print_frame(frame, fmt, f"{component_type} executions")


@click.command()
@_store_options
@click.argument("artifact_id", type=int)
@click.option("--hops", default=4, show_default=True, help="Edges (artifact<->execution) to follow.")
@click.option("--direction", type=click.Choice(["up", "down", "both"]), default="both", show_default=True)
@click.option("--out", default=None, help="Write the graph to this .png or .svg file.")
@_format_option
def lineage(store: Any, artifact_id: int, hops: int, direction: str, out: str | None, fmt: str) -> None:
    """Show what ARTIFACT_ID was made from and what was made from it."""
    from beam_pipeline import lineage as lineage_module

    graph = lineage_module.lineage(store, artifact_id, hops, direction)
    if out:
        click.echo(graph.render(out))
        return
    if fmt == "json":
        click.echo(json.dumps(graph.to_dict(), indent=2))
        return
    _print_frame(graph.nodes_frame(), fmt, f"lineage of artifact {artifact_id}: nodes")
    _print_frame(graph.edges_frame(), fmt, "edges")


@click.command("model-stats")
@_store_options
@click.argument("model_ids", type=int, nargs=-1, required=True)
@click.option("--out", default="model_stats.html", show_default=True, help="HTML file to write.")
def model_stats(store: Any, model_ids: tuple[int, ...], out: str) -> None:
    """Statistics of the data MODEL_ID was trained on; with a second id, side by side."""
    from beam_pipeline import report

    click.echo(report.write_model_stats_html(store, list(model_ids), out))


@click.command("model-metrics")
@_store_options
@click.argument("model_id", type=int)
@click.option("--slice", "slice_column", default=None, help="Column the evaluation was sliced by.")
@click.option("--out", default=None, help="Also write an HTML view (tables and plots) to this file.")
@_format_option
def model_metrics(store: Any, model_id: int, slice_column: str | None, out: str | None, fmt: str) -> None:
    """TFMA metrics of MODEL_ID, overall and per slice."""
    from beam_pipeline import queries, report

    _print_frame(queries.model_metrics(store, model_id, slice_column), fmt, f"metrics of model {model_id}")
    if out:
        click.echo(report.write_model_metrics_html(store, model_id, slice_column, out))


@click.command()
@_store_options
@click.argument("model_ids", type=int, nargs=-1, required=True)
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: a free one).")
def tensorboard(store: Any, model_ids: tuple[int, ...], port: int | None) -> None:
    """Serve TensorBoard on the training logs of one or more models until Ctrl-C or SIGTERM."""
    from beam_pipeline import queries

    # Our own handlers, whatever this process inherited: a shell's background job starts with
    # SIGINT ignored, and then Ctrl-C would never reach Python as KeyboardInterrupt.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = queries.start_tensorboard(store, list(model_ids), port)
        try:
            for name, directory in server.logdirs.items():
                click.echo(f"{name}: {directory}")
            click.echo(f"TensorBoard at {server.url} (Ctrl-C to stop)")
            while not stop.wait(timeout=1.0):  # a bounded wait, so a signal is seen within a second
                pass
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("TensorBoard stopped")


@click.command()
@_store_options
@click.argument("lhs", type=int)
@click.argument("rhs", type=int)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def diff(store: Any, lhs: int, rhs: int, fmt: str) -> None:
    """What differs between the lineages of models LHS and RHS: data, schema, stats, code, config, metrics."""
    from beam_pipeline import queries

    result = queries.diff(store, lhs, rhs)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    sections = [
        ("Data", result.data),
        ("Schema changes", result.schema),
        ("Configuration changes", result.config),
        ("Metrics (overall)", result.metrics),
    ]
    for title, frame in sections:
        if frame.empty:
            click.echo(f"{title}: no differences\n")
        else:
            _print_frame(frame, "table", f"{title}: model {lhs} vs {rhs}")
    drift = result.statistics
    if drift.empty:
        click.echo("Statistics: same data or no statistics\n")
    else:
        moved = (
            (drift["mean_change_pct"].abs().fillna(0) > 1)
            | (drift["drift"].fillna(0) > 0.01)
            | (drift["lhs_unique"].fillna(-1) != drift["rhs_unique"].fillna(-1))
        )
        changed = drift[moved]
        _print_frame(
            changed,
            "table",
            f"Statistics that moved (|mean change| > 1% or TFDV drift > 0.01): {len(changed)} of {len(drift)}",
        )
    if not result.code:
        click.echo("User code: no differences")
    for name, text in result.code.items():
        click.echo(f"User code {name}:\n{text}")


@click.command()
@_store_options
@click.argument("run_id", required=False)
@click.option("--pipeline", "pipeline_name", required=True, help="Pipeline name.")
@click.option("--out", "out_dir", required=True, help="Folder to write index.html into.")
def report(store: Any, run_id: str | None, pipeline_name: str, out_dir: str) -> None:
    """Write the static HTML report of RUN_ID (default: the newest run of --pipeline)."""
    from beam_pipeline import queries
    from beam_pipeline import report as report_module

    run_id = run_id or queries.latest_run_id(store, pipeline_name)
    click.echo(report_module.write_run_report(store, pipeline_name, run_id, out_dir))


commands = [runs, executions, lineage, model_stats, model_metrics, tensorboard, diff, report]
