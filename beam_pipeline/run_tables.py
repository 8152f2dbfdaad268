"""Tables of pipeline runs and of the executions they recorded, newest run first."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import pandas as pd
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline._mlmd_reading import execution_config, flatten, open_store, prop_value, state_name
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import (
    ABANDONED,
    PIPELINE_CONTEXT,
    RUN_CONTEXT,
    STALE_HEARTBEAT_S,
    MetadataStore,
    launcher_alive,
)

EXECUTION_COLUMNS = (
    "id",
    "type",
    "component_id",
    "pipeline",
    "run_id",
    "state",
    "start",
    "end",
    "duration_s",
    "inputs",
    "outputs",
    "error",
)
RUN_COLUMNS = (
    "pipeline",
    "run_id",
    "state",
    "start",
    "end",
    "duration_s",
    "components",
    "complete",
    "cached",
    "failed",
)


def _timestamp(ms: int | None) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _duration_s(e: mlmd_pb2.Execution) -> float | None:
    start, end = prop_value(e, "start_time_ms"), prop_value(e, "end_time_ms")
    if not start or not end:
        return None
    return max(0.0, (end - start) / 1000)


def _launcher_gone(run_context: mlmd_pb2.Context) -> bool:
    """True when the run's launcher is known dead: gone from this host, or silent for too long."""
    raw = prop_value(run_context, "launcher")
    if not raw:
        return False
    alive = launcher_alive(json.loads(raw))
    if alive is not None:
        return not alive
    beat_ms = prop_value(run_context, "heartbeat_ms") or 0
    return time.time() - beat_ms / 1000 > STALE_HEARTBEAT_S


def _events(store: MetadataStore, execution_ids: Iterable[int]) -> dict[int, list[mlmd_pb2.Event]]:
    by_execution: dict[int, list[mlmd_pb2.Event]] = {}
    ids = list(execution_ids)
    if ids:
        for ev in store.mlmd.get_events_by_execution_ids(ids):
            by_execution.setdefault(ev.execution_id, []).append(ev)
    return by_execution


def _io_ids(events: list[mlmd_pb2.Event]) -> tuple[dict[str, list[int]], dict[str, int]]:
    inputs: dict[str, list[int]] = {}
    outputs: dict[str, int] = {}
    for ev in sorted(events, key=lambda ev: ev.artifact_id):
        name = ev.path.steps[0].key if ev.path.steps else ""
        if ev.type == mlmd_pb2.Event.INPUT:
            inputs.setdefault(name, []).append(ev.artifact_id)
        elif ev.type == mlmd_pb2.Event.OUTPUT:
            outputs[name] = ev.artifact_id
    return inputs, outputs


# -- runs and executions -----------------------------------------------------------------------------
def _execution_rows(store: MetadataStore, executions: list[mlmd_pb2.Execution]) -> list[dict[str, Any]]:
    events = _events(store, [e.id for e in executions])
    rows = []
    for e in sorted(executions, key=lambda e: e.id):
        inputs, outputs = _io_ids(events.get(e.id, []))
        row: dict[str, Any] = {
            "id": e.id,
            "type": e.type,
            "component_id": prop_value(e, "component_id"),
            "pipeline": prop_value(e, "pipeline_name"),
            "run_id": prop_value(e, "run_id"),
            "state": state_name(e),
            "start": _timestamp(prop_value(e, "start_time_ms")),
            "end": _timestamp(prop_value(e, "end_time_ms")),
            "duration_s": _duration_s(e),
            "inputs": inputs,
            "outputs": outputs,
            "error": prop_value(e, "error"),
        }
        for key, value in flatten(execution_config(e)).items():
            row[key if key not in row else f"config.{key}"] = value
        rows.append(row)
    return rows


def executions(
    store: MetadataStore | str,
    component_type: str,
    *,
    pipeline_name: str | None = None,
    run_id: str | None = None,
) -> pd.DataFrame:
    """Every execution of one component type (e.g. all Trainer runs), its config flattened into columns."""
    store = open_store(store)
    known = sorted(t.name for t in store.mlmd.get_execution_types())
    if component_type not in known:
        raise MetadataError(f"no executions of type {component_type!r} in {store.uri}; types are {known}")
    found = [
        e
        for e in store.mlmd.get_executions_by_type(component_type)
        if (pipeline_name is None or prop_value(e, "pipeline_name") == pipeline_name)
        and (run_id is None or prop_value(e, "run_id") == run_id)
    ]
    return pd.DataFrame(_execution_rows(store, found), columns=None if found else list(EXECUTION_COLUMNS))


def run_executions(store: MetadataStore | str, pipeline_name: str, run_id: str) -> pd.DataFrame:
    """The executions one pipeline run recorded, in the order they were registered."""
    store = open_store(store)
    ctx = store.mlmd.get_context_by_type_and_name(RUN_CONTEXT, f"{pipeline_name}.{run_id}")
    if ctx is None:
        raise MetadataError(f"no run {run_id!r} of pipeline {pipeline_name!r} in {store.uri}")
    rows = _execution_rows(store, store.mlmd.get_executions_by_context(ctx.id))
    return pd.DataFrame(rows, columns=None if rows else list(EXECUTION_COLUMNS))


def run_state(states: list[str]) -> str:
    """A run's state from its executions': any failure fails it; all cached means nothing ran."""
    if "FAILED" in states:
        return "FAILED"
    if ABANDONED in states:
        return ABANDONED
    if any(s in ("RUNNING", "NEW", "UNKNOWN") for s in states):
        return "RUNNING"
    if states and all(s == "CACHED" for s in states):
        return "CACHED"
    return "COMPLETE"


def runs(store: MetadataStore | str, pipeline_name: str | None = None) -> pd.DataFrame:
    """One row per pipeline run, newest first: overall state, span and how many components ran or were cached."""
    store = open_store(store)
    pipelines = [c.name for c in store.mlmd.get_contexts_by_type(PIPELINE_CONTEXT)]
    rows = []
    for ctx in store.mlmd.get_contexts_by_type(RUN_CONTEXT):
        owner = next((p for p in pipelines if ctx.name.startswith(p + ".")), ctx.name.rsplit(".", 1)[0])
        if pipeline_name is not None and owner != pipeline_name:
            continue
        found = store.mlmd.get_executions_by_context(ctx.id)
        states = [state_name(e) for e in found]
        if "RUNNING" in states and _launcher_gone(ctx):  # killed; the next run of it will record that
            states = [ABANDONED if s == "RUNNING" else s for s in states]
        starts = [s for s in (prop_value(e, "start_time_ms") for e in found) if s]
        ends = [s for s in (prop_value(e, "end_time_ms") for e in found) if s]
        start, end = (min(starts) if starts else None), (max(ends) if ends else None)
        rows.append(
            {
                "pipeline": owner,
                "run_id": ctx.name[len(owner) + 1 :],
                "state": run_state(states),
                "start": _timestamp(start),
                "end": _timestamp(end),
                "duration_s": max(0.0, (end - start) / 1000) if start and end else None,
                "components": len(found),
                "complete": states.count("COMPLETE"),
                "cached": states.count("CACHED"),
                "failed": states.count("FAILED"),
            }
        )
    rows.sort(key=lambda r: r["run_id"], reverse=True)
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def latest_run_id(store: MetadataStore | str, pipeline_name: str) -> str:
    """The newest run of a pipeline (run ids are UTC timestamps, so they sort by time)."""
    table = runs(store, pipeline_name)
    if table.empty:
        raise MetadataError(f"pipeline {pipeline_name!r} has no runs in the store")
    return str(table.iloc[0]["run_id"])
