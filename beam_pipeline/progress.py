"""Progress while a run goes on and the summary table after it: rich on a terminal, plain logs otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.live import Live
from rich.table import Table

from beam_pipeline.dsl import Pipeline
from beam_pipeline.launcher import RunResult

_STYLE = {
    "COMPLETE": "green",
    "CACHED": "cyan",
    "FAILED": "red",
    "RUNNING": "yellow",
    "PENDING": "dim",
    "SKIPPED": "dim",
}


def _seconds(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else ""


def _table(result: RunResult, title: str) -> Table:
    table = Table(title=title)
    for col in ("component", "state", "busy", "committed at", "execution", "output artifacts (id: path)"):
        table.add_column(col)
    for r in result.components.values():
        arts = "\n".join(f"{name} #{a.id}: {a.uri}" for name, a in r.artifacts.items())
        at = (r.end_time_ms - result.start_ms) / 1000 if r.end_time_ms and r.state == "COMPLETE" else None
        table.add_row(
            r.id,
            f"[{_STYLE.get(r.state, '')}]{r.state}[/]",
            _seconds(r.busy_s),
            f"+{_seconds(at)}" if at is not None else "",
            str(r.execution_id or ""),
            arts,
        )
    table.caption = "busy: time the runner spent in the component's transforms; committed at: since the run began"
    return table


def _model_outcome(result: RunResult) -> list[str]:
    """The evaluated model's overall metrics, the blessing decision and the push, in plain words."""
    from beam_pipeline import queries

    lines = []
    for r in result.components.values():
        for name, a in r.artifacts.items():
            if a.type.name == "ModelEvaluation":
                frame = queries.metrics_frame(queries.load_eval_result(a.uri))
                overall = frame[frame["slice"] == "Overall"]
                if not overall.empty:
                    row = overall.iloc[0]
                    shown = [f"{m}={row[m]:.4f}" for m in ("auc", "binary_accuracy", "auc_pr") if m in row]
                    count = f" on {int(row['example_count'])} examples" if "example_count" in row else ""
                    lines.append(f"{r.id}.{name}: overall {', '.join(shown)}{count}")
            elif a.type.name == "ModelBlessing":
                lines.append(f"{r.id}.{name}: {a.properties.get('blessing_message', a.properties.get('blessed'))}")
            elif a.type.name == "PushedModel":
                lines.append(f"{r.id}.{name}: {a.properties.get('push_message', a.properties.get('pushed'))}")
    return lines


class Progress:
    """Live per-component states; falls back to one log line per state change off a terminal."""

    def __init__(self, pipeline: Pipeline, console: Console | None = None):
        self.console = console or Console()
        if not self.console.is_terminal:
            self.console.width = 200  # logs and CI: keep artifact paths whole
        self._live: Live | None = None
        self._seen: dict[str, str] = {}
        self._pipeline = pipeline

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, result: RunResult) -> None:
        if self._live is not None:
            self._live.update(_table(result, f"{result.pipeline_name} run {result.run_id}"))
            return
        for r in result.components.values():
            if self._seen.get(r.id) != r.state:
                self._seen[r.id] = r.state
                extra = f" (+{(r.end_time_ms - result.start_ms) / 1000:.1f}s)" if r.end_time_ms else ""
                print(f"[{result.pipeline_name}] {r.id}: {r.state}{extra}", file=sys.stderr, flush=True)

    def summary(self, result: RunResult) -> None:
        self.console.print(_table(result, f"{result.pipeline_name} run {result.run_id}: summary"))
        for line in _model_outcome(result):
            self.console.print(line, highlight=False)
        self.console.print(f"ML Metadata: {result.metadata_uri}")
        self.console.print(f"Pipeline root: {result.pipeline_root}")
        for r in result.components.values():
            for name, a in r.artifacts.items():
                bad = a.properties.get("bad_records")
                if bad:
                    self.console.print(f"[yellow]{r.id}.{name}: {bad} bad records skipped, see {a.uri}/Quarantine[/]")
