"""The one lineage walker: ML Metadata's own lineage query, walked breadth-first to count hops and apply rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline.metadata import MetadataStore

# Deeper than any pipeline: each component is two hops (artifact -> execution -> artifact).
MAX_HOPS = 100
_OPTIONS = mlmd_pb2.LineageSubgraphQueryOptions


@dataclasses.dataclass
class Walk:
    """Nodes reached, each with its distance in hops, and the events walked (source, target, kind, name)."""

    artifact_hops: dict[int, int]
    execution_hops: dict[int, int]
    edges: set[tuple[str, str, str, str]]


def walk(
    store: MetadataStore,
    artifact_id: int,
    num_hops: int,
    upward: bool,
    *,
    originals_only: bool = False,
    stop_at_types: Collection[str] = (),
) -> Walk:
    """From one artifact, up to what it was made from or down to what was made from it.

    `originals_only`: of an artifact's producers, follow the execution that made it, not the runs
    that reused it from the cache (they only repeat what it read). `stop_at_types`: artifacts of
    these types are reached but not walked through (a warm-start model describes another model).
    """
    options = _OPTIONS(
        starting_artifacts=_OPTIONS.StartingNodes(filter_query=f"id = {artifact_id}"),
        max_num_hops=num_hops,
        direction=_OPTIONS.UPSTREAM if upward else _OPTIONS.DOWNSTREAM,
    )
    graph = store.mlmd.get_lineage_subgraph(options, ["events", "executions", "artifacts"])
    cached = {e.id for e in graph.executions if e.last_known_state == mlmd_pb2.Execution.CACHED}
    stop_ids = {t.id for t in store.mlmd.get_artifact_types() if t.name in stop_at_types} if stop_at_types else set()
    stops = {a.id for a in graph.artifacts if a.type_id in stop_ids and a.id != artifact_id}
    # Upstream, an artifact leads to the executions that output it, an execution to what it read.
    to_execution = mlmd_pb2.Event.OUTPUT if upward else mlmd_pb2.Event.INPUT
    to_artifact = mlmd_pb2.Event.INPUT if upward else mlmd_pb2.Event.OUTPUT
    by_artifact: dict[int, list[mlmd_pb2.Event]] = {}
    by_execution: dict[int, list[mlmd_pb2.Event]] = {}
    for ev in graph.events:
        if ev.type == to_execution:
            by_artifact.setdefault(ev.artifact_id, []).append(ev)
        elif ev.type == to_artifact:
            by_execution.setdefault(ev.execution_id, []).append(ev)
    result = Walk({artifact_id: 0}, {}, set())
    frontier, hop = [artifact_id], 0
    while frontier and hop < num_hops:
        hop += 1
        executions = []
        for a in frontier:
            events = by_artifact.get(a, [])
            if originals_only:
                events = [ev for ev in events if ev.execution_id not in cached] or events
            for ev in events:
                result.edges.add(edge(ev))
                if ev.execution_id not in result.execution_hops:
                    result.execution_hops[ev.execution_id] = hop
                    executions.append(ev.execution_id)
        if not executions or hop >= num_hops:
            break
        hop += 1
        frontier = []
        for ev in (ev for e in executions for ev in by_execution.get(e, [])):
            result.edges.add(edge(ev))
            if ev.artifact_id not in result.artifact_hops:
                result.artifact_hops[ev.artifact_id] = hop
                if ev.artifact_id not in stops:
                    frontier.append(ev.artifact_id)
    return result


def edge(ev: mlmd_pb2.Event) -> tuple[str, str, str, str]:
    """(source, target, INPUT/OUTPUT, input or output name) of one event, as graph node ids."""
    name = ev.path.steps[0].key if ev.path.steps else ""
    if ev.type == mlmd_pb2.Event.INPUT:
        return (f"artifact:{ev.artifact_id}", f"execution:{ev.execution_id}", "INPUT", name)
    return (f"execution:{ev.execution_id}", f"artifact:{ev.artifact_id}", "OUTPUT", name)
