"""Lineage of one artifact: what it was made from and what was made from it, as data and as a graph.

A hop is one edge of ML Metadata's bipartite graph (artifact -> execution or execution -> artifact),
the unit MLMD's own lineage queries count in: 2 hops upstream of a model reach the Trainer and its
inputs. The picture is laid out in layers by `graph_drawing` (no graphviz needed).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pandas as pd
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import artifact_io, graph_drawing, queries
from beam_pipeline._lineage_walk import walk
from beam_pipeline.errors import BeamPipelineError, MetadataError
from beam_pipeline.metadata import MetadataStore

DIRECTIONS = ("up", "down", "both")
STATE_COLORS = {
    "COMPLETE": "#c8e6c9",
    "CACHED": "#bbdefb",
    "FAILED": "#ffcdd2",
    "RUNNING": "#fff9c4",
}
ARTIFACT_COLOR = "#f5f5f5"
ROOT_COLOR = "#ffe082"


@dataclasses.dataclass
class LineageGraph:
    """Nodes (`artifact:<id>` / `execution:<id>`) and INPUT/OUTPUT edges, always artifact-execution pairs."""

    artifact_id: int
    direction: str
    num_hops: int
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]

    def nodes_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.nodes, columns=["node", "kind", "id", "type", "name", "state", "uri", "hops"])

    def edges_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.edges, columns=["source", "target", "event", "name"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact_id": self.artifact_id,
            "direction": self.direction,
            "num_hops": self.num_hops,
            "nodes": self.nodes,
            "edges": self.edges,
        }

    def drawing(self) -> tuple[list[graph_drawing.Node], list[graph_drawing.Edge]]:
        """Boxes for executions (state colour), folded notes for artifacts (the one asked about highlighted)."""
        nodes = []
        for n in self.nodes:
            if n["kind"] == "artifact":
                root = n["id"] == self.artifact_id
                nodes.append(
                    graph_drawing.Node(
                        n["node"], f"{n['type']} #{n['id']}", (n["name"],) if n["name"] else (),
                        fill=ROOT_COLOR if root else ARTIFACT_COLOR, note=True, emphasis=root, tooltip=n["uri"] or "",
                    )
                )  # fmt: skip
            else:
                kind = "" if n["type"] == n["name"] else f"{n['type']} · "
                nodes.append(
                    graph_drawing.Node(
                        n["node"], f"{n['name']} #{n['id']}", (f"{kind}{n['state']}",),
                        fill=STATE_COLORS.get(n["state"], "#eeeeee"),
                    )
                )  # fmt: skip
        edges = [graph_drawing.Edge(e["source"], e["target"], e["name"]) for e in self.edges]
        return nodes, edges

    def svg(self) -> str:
        """The graph as an `<svg>` element, left to right in the direction data flows."""
        return graph_drawing.svg(*self.drawing(), title=f"lineage of artifact {self.artifact_id}")

    def render(self, path: str) -> str:
        """Write the graph as PNG or SVG (chosen by the file extension); returns the path."""
        fmt = os.path.splitext(path)[1].lstrip(".").lower()
        if fmt not in ("png", "svg"):
            raise BeamPipelineError(f"lineage image {path!r}: use a .png or .svg file name")
        data = self.svg().encode() if fmt == "svg" else graph_drawing.png(*self.drawing())
        artifact_io.write_bytes_atomic(path, data)  # local or object store
        return path


def _node_for_artifact(artifact: Any, hops: int) -> dict[str, Any]:
    name = artifact.properties.get("producer_component") or ""
    return {
        "node": f"artifact:{artifact.id}",
        "kind": "artifact",
        "id": artifact.id,
        "type": artifact.type.name,
        "name": name,
        "state": None,
        "uri": artifact.uri,
        "hops": hops,
    }


def _node_for_execution(execution: mlmd_pb2.Execution, hops: int) -> dict[str, Any]:
    return {
        "node": f"execution:{execution.id}",
        "kind": "execution",
        "id": execution.id,
        "type": execution.type,
        "name": queries.prop_value(execution, "component_id") or execution.type,
        "state": queries.state_name(execution),
        "uri": None,
        "hops": hops,
    }


def lineage(store: MetadataStore | str, artifact_id: int, num_hops: int = 4, direction: str = "both") -> LineageGraph:
    """The artifact's lineage within `num_hops` edges, upstream (`up`), downstream (`down`) or `both`."""
    if direction not in DIRECTIONS:
        raise MetadataError(f"lineage direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    if num_hops < 1:
        raise MetadataError(f"num_hops={num_hops}: expected at least 1")
    store = queries.open_store(store)
    queries.get_artifact(store, artifact_id)
    artifact_hops: dict[int, int] = {}
    execution_hops: dict[int, int] = {}
    edges: set[tuple[str, str, str, str]] = set()
    for upward in [d == "up" for d in (("up", "down") if direction == "both" else (direction,))]:
        found = walk(store, artifact_id, num_hops, upward)
        for key, hops in found.artifact_hops.items():
            artifact_hops[key] = min(hops, artifact_hops.get(key, hops))
        for key, hops in found.execution_hops.items():
            execution_hops[key] = min(hops, execution_hops.get(key, hops))
        edges |= found.edges
    artifacts = {a.id: a for a in store.get_artifacts(artifact_hops)}
    executions = {e.id: e for e in store.mlmd.get_executions_by_id(list(execution_hops))} if execution_hops else {}
    nodes = [_node_for_artifact(artifacts[i], artifact_hops[i]) for i in sorted(artifact_hops) if i in artifacts]
    nodes += [_node_for_execution(executions[i], execution_hops[i]) for i in sorted(execution_hops) if i in executions]
    edge_rows = [{"source": s, "target": t, "event": kind, "name": name} for s, t, kind, name in sorted(edges)]
    return LineageGraph(artifact_id, direction, num_hops, nodes, edge_rows)
