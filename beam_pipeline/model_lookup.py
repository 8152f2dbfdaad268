"""Walking lineage: what an artifact was made from and read by, and a model's run, evaluation, outcome and data."""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline._lineage_walk import MAX_HOPS, walk
from beam_pipeline._mlmd_reading import _outputs_of, get_artifact, open_store
from beam_pipeline.artifacts import (
    EXAMPLES,
    MODEL,
    MODEL_BLESSING,
    MODEL_EVALUATION,
    MODEL_RUN,
    PUSHED_MODEL,
    SCHEMA,
    STATISTICS,
    Artifact,
)
from beam_pipeline.data_tables import read_statistics
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import MetadataStore


# -- walking lineage ---------------------------------------------------------------------------------
def producers(store: MetadataStore, artifact_id: int) -> list[mlmd_pb2.Execution]:
    """Executions that output the artifact: the one that made it first, then runs that reused it from cache."""
    ids = [
        ev.execution_id
        for ev in store.mlmd.get_events_by_artifact_ids([artifact_id])
        if ev.type == mlmd_pb2.Event.OUTPUT
    ]
    found = store.mlmd.get_executions_by_id(ids) if ids else []
    return sorted(found, key=lambda e: (e.last_known_state == mlmd_pb2.Execution.CACHED, e.id))


def consumers(store: MetadataStore, artifact_id: int, input_name: str | None = None) -> list[mlmd_pb2.Execution]:
    """Executions that read the artifact (under `input_name` when given), newest first."""
    ids = [
        ev.execution_id
        for ev in store.mlmd.get_events_by_artifact_ids([artifact_id])
        if ev.type == mlmd_pb2.Event.INPUT
        and (input_name is None or (ev.path.steps and ev.path.steps[0].key == input_name))
    ]
    found = store.mlmd.get_executions_by_id(ids) if ids else []
    return sorted(found, key=lambda e: e.id, reverse=True)


def upstream(store: MetadataStore, artifact_id: int) -> tuple[list[mlmd_pb2.Execution], list[Artifact]]:
    """Every execution and artifact the artifact was derived from, nearest first (breadth-first).

    Model inputs met on the way (a warm-start model, an evaluation baseline) are listed but not
    followed: their own lineage describes another model, not how this one was made.
    """
    found = walk(store, artifact_id, MAX_HOPS, upward=True, originals_only=True, stop_at_types=[MODEL.name])
    executions = store.mlmd.get_executions_by_id(list(found.execution_hops)) if found.execution_hops else []
    ids = [i for i in found.artifact_hops if i != artifact_id]
    artifacts = store.get_artifacts(ids) if ids else []
    return (
        sorted(executions, key=lambda e: (found.execution_hops[e.id], e.id)),
        sorted(artifacts, key=lambda a: (found.artifact_hops[a.id], a.id or 0)),
    )


def model_run(store: MetadataStore | str, model_id: int) -> Artifact:
    """The ModelRun (TensorBoard logs) the Trainer wrote next to the model."""
    store = open_store(store)
    get_artifact(store, model_id, MODEL.name)
    for e in producers(store, model_id):
        for artifact in _outputs_of(store, e.id).values():
            if artifact.type.name == MODEL_RUN.name:
                return artifact
    raise MetadataError(f"model {model_id} has no ModelRun artifact: its trainer recorded no TensorBoard logs")


def model_evaluation(store: MetadataStore | str, model_id: int) -> Artifact | None:
    """The newest evaluation of the model as the candidate (not as someone else's baseline)."""
    store = open_store(store)
    for e in consumers(store, model_id, "model"):
        for artifact in _outputs_of(store, e.id).values():
            if artifact.type.name == MODEL_EVALUATION.name and e.last_known_state in (
                mlmd_pb2.Execution.COMPLETE,
                mlmd_pb2.Execution.CACHED,
            ):
                return artifact
    return None


def model_outcome(store: MetadataStore | str, model_id: int) -> dict[str, Any]:
    """Whether the model was blessed and where it was pushed (None where no such step ran)."""
    store = open_store(store)
    blessing, pushed = None, None
    for e in consumers(store, model_id, "model"):
        for artifact in _outputs_of(store, e.id).values():
            if artifact.type.name == MODEL_BLESSING.name and blessing is None:
                blessing = artifact
            if artifact.type.name == PUSHED_MODEL.name and pushed is None:
                pushed = artifact
    return {
        "blessed": None if blessing is None else bool(int(blessing.properties.get("blessed") or 0)),
        "blessing_id": blessing.id if blessing else None,
        "pushed": None if pushed is None else bool(int(pushed.properties.get("pushed") or 0)),
        "pushed_destination": pushed.properties.get("pushed_destination") if pushed else None,
        "pushed_model_id": pushed.id if pushed else None,
    }


# -- statistics a model was trained on ---------------------------------------------------------------
@dataclasses.dataclass
class TrainingData:
    """The data behind a model: the raw Examples, their statistics and the schema the pipeline used."""

    model_id: int
    examples: Artifact
    statistics: Artifact
    schema: Artifact | None
    stats: dict[str, Any]  # split -> DatasetFeatureStatisticsList

    @property
    def train_split(self) -> str:
        return "train" if "train" in self.stats else next(iter(self.stats))


def _statistics_of(store: MetadataStore, examples: Artifact) -> Artifact | None:
    for e in consumers(store, examples.id):
        if e.last_known_state not in (mlmd_pb2.Execution.COMPLETE, mlmd_pb2.Execution.CACHED):
            continue
        inputs, outputs = store.execution_artifacts(e.id)
        if [a.id for group in inputs.values() for a in group if a.type.name == EXAMPLES.name] != [examples.id]:
            continue  # statistics over several datasets describe none of them alone
        for artifact in outputs.values():
            if artifact.type.name == STATISTICS.name:
                return artifact
    return None


def training_data(store: MetadataStore | str, model_id: int) -> TrainingData:
    """Walk model -> trainer inputs -> (transform ->) examples, and find the statistics computed on them."""
    store = open_store(store)
    get_artifact(store, model_id, MODEL.name)
    _, ancestors = upstream(store, model_id)
    schema = next((a for a in ancestors if a.type.name == SCHEMA.name), None)
    for examples in (a for a in ancestors if a.type.name == EXAMPLES.name):
        statistics = _statistics_of(store, examples)
        if statistics is not None:
            return TrainingData(model_id, examples, statistics, schema, read_statistics(statistics))
    raise MetadataError(f"model {model_id}: no statistics were computed on any Examples in its lineage")
