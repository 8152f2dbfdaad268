"""Artifact types and the Artifact record: what a component produces, where it lives, what it holds."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# Properties every artifact type carries in ML Metadata (all stored as STRING; JSON where structured).
COMMON_PROPERTIES = ("fingerprint", "split_names", "row_counts", "producer_component", "pipeline_name", "state")

# Name of the marker written into an artifact's directory once all of its files are complete.
COMMIT_MARKER = "_ARTIFACT.json"


@dataclasses.dataclass(frozen=True)
class ArtifactType:
    """A kind of artifact. `name` is the ML Metadata type name (TFX's names, so TFX users recognise them)."""

    name: str
    extra_properties: tuple[str, ...] = ()

    @property
    def properties(self) -> tuple[str, ...]:
        return COMMON_PROPERTIES + self.extra_properties


EXAMPLES = ArtifactType("Examples")
STATISTICS = ArtifactType("ExampleStatistics")
SCHEMA = ArtifactType("Schema")
ANOMALIES = ArtifactType("ExampleAnomalies", ("anomaly_count",))
TRANSFORM_GRAPH = ArtifactType("TransformGraph")
MODEL = ArtifactType("Model")
MODEL_RUN = ArtifactType("ModelRun")
MODEL_EVALUATION = ArtifactType("ModelEvaluation")
MODEL_BLESSING = ArtifactType("ModelBlessing", ("blessed",))
PUSHED_MODEL = ArtifactType("PushedModel", ("pushed", "pushed_destination", "pushed_version"))
INFERENCE_RESULT = ArtifactType("InferenceResult")
INFRA_BLESSING = ArtifactType("InfraBlessing", ("infra_blessed",))

ALL_TYPES = {
    t.name: t
    for t in (
        EXAMPLES,
        STATISTICS,
        SCHEMA,
        ANOMALIES,
        TRANSFORM_GRAPH,
        MODEL,
        MODEL_RUN,
        MODEL_EVALUATION,
        MODEL_BLESSING,
        PUSHED_MODEL,
        INFERENCE_RESULT,
        INFRA_BLESSING,
    )
}


@dataclasses.dataclass
class Artifact:
    """One artifact: its type, its directory and its properties (JSON-able values)."""

    type: ArtifactType
    uri: str
    properties: dict[str, Any] = dataclasses.field(default_factory=dict)
    id: int | None = None

    @property
    def split_names(self) -> list[str]:
        return list(self.properties.get("split_names") or [])

    def split_uri(self, split: str) -> str:
        return f"{self.uri}/Split-{split}"

    def to_json(self) -> str:
        return json.dumps({"type": self.type.name, "uri": self.uri, "properties": self.properties, "id": self.id})
