"""Importer and Resolver: pipeline nodes whose outputs the launcher settles when it plans a run.

Neither runs in the Beam graph. An Importer registers files that exist outside the pipeline (a
curated schema, a pretrained model) as an artifact in ML Metadata; a Resolver picks an artifact
ML Metadata already holds (the latest blessed model, the latest schema). Each is recorded as an
execution with its output, so lineage runs through it, and its output feeds any component's input
like a cached component's would. A Resolver that finds nothing has no output: a consumer's optional
input is then left out (the Evaluator's first run has no baseline), a required one fails the plan.

    baseline = Resolver(LatestBlessedModel(), component_id="LatestBlessedModel")
    evaluator = Evaluator(examples=..., model=trainer.outputs.model, baseline_model=baseline.outputs.model, ...)
    schema = Importer(source_uri="curated/schema", artifact_type=SCHEMA, component_id="CuratedSchema")
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import MODEL, MODEL_BLESSING, PUSHED_MODEL, Artifact, ArtifactType
from beam_pipeline.dsl import Component
from beam_pipeline.errors import MetadataError, PipelineDefinitionError


class PlannedNode(Component):
    """A node the launcher settles at plan time (`plan_outputs`); nothing of it runs in the graph."""

    PLANNED = True

    @abc.abstractmethod
    def plan_outputs(self, store: Any, pipeline_name: str) -> dict[str, Artifact]:
        """Each output's artifact (an output left out was resolved to nothing)."""

    def expand(self, inputs: Any) -> Any:
        raise PipelineDefinitionError(f"{self.id}: a {type(self).__name__} is settled by the launcher, not applied")


class Importer(PlannedNode):
    """Bring the files under `source_uri` into ML Metadata as one artifact of `artifact_type` (output `result`).

    The files must have the layout the type's consumers read (a Schema: `schema.pbtxt`; a Model:
    `Format-Serving/` with a SavedModel; Examples: `Split-<name>/*.parquet` and the `split_names`
    and `payload_format` properties). The artifact's fingerprint is the files' content: while it is
    unchanged, every run links the artifact registered first (so consumers stay cached); when the
    files change, or with `reimport=True`, a new artifact is registered. Nothing is copied.
    """

    def __init__(
        self,
        *,
        source_uri: str,
        artifact_type: ArtifactType,
        properties: Mapping[str, Any] | None = None,
        reimport: bool = False,
        component_id: str | None = None,
    ):
        if not source_uri:
            raise PipelineDefinitionError("Importer needs source_uri, the directory of the files to import")
        if not isinstance(artifact_type, ArtifactType):
            raise PipelineDefinitionError(
                f"Importer artifact_type must be an ArtifactType such as beam_pipeline.artifacts.SCHEMA, "
                f"got {artifact_type!r}"
            )
        self.OUTPUTS = {"result": artifact_type}
        super().__init__(
            inputs={},
            params={"source_uri": source_uri.rstrip("/"), "properties": dict(properties or {}), "reimport": reimport},
            component_id=component_id,
        )

    def plan_outputs(self, store: Any, pipeline_name: str) -> dict[str, Artifact]:
        uri, atype = self.params["source_uri"], self.OUTPUTS["result"]
        files = artifact_io.payload_files(uri)
        if not files:
            raise PipelineDefinitionError(f"{self.id}: no files under {uri} to import as {atype.name}")
        fingerprint = artifact_io.fingerprint_tree(uri, files)
        if not self.params["reimport"]:
            same = {"fingerprint": fingerprint, "producer_component": self.id}
            for existing in store.latest_artifacts(atype.name, pipeline_name, same):
                if existing.uri == uri:
                    return {"result": existing}
        properties = {
            **self.params["properties"],
            "fingerprint": fingerprint,
            "producer_component": self.id,
            "pipeline_name": pipeline_name,
        }
        return {"result": Artifact(atype, uri, properties)}


class ResolverStrategy(abc.ABC):
    """How a Resolver picks its artifact from ML Metadata."""

    output: str
    artifact_type: ArtifactType

    @abc.abstractmethod
    def resolve(self, store: Any, pipeline_name: str) -> Artifact | None:
        """The artifact, or None when there is none yet."""

    def config(self) -> dict[str, Any]:
        return {"strategy": type(self).__name__}


class LatestArtifact(ResolverStrategy):
    """The newest published artifact of `artifact_type` in the pipeline (output `artifact`), optionally
    from one producer and matching `properties`."""

    output = "artifact"

    def __init__(
        self, artifact_type: ArtifactType, *, producer: str | None = None, properties: Mapping[str, Any] | None = None
    ):
        self.artifact_type = artifact_type
        self.criteria = dict(properties or {})
        if producer:
            self.criteria["producer_component"] = producer

    def resolve(self, store: Any, pipeline_name: str) -> Artifact | None:
        found = store.latest_artifacts(self.artifact_type.name, pipeline_name, self.criteria)
        return found[0] if found else None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "artifact_type": self.artifact_type.name, "criteria": self.criteria}


class LatestBlessedModel(ResolverStrategy):
    """The model of the newest blessing (blessed=1) in the pipeline (output `model`), from one Evaluator
    when `evaluator` names it. A blessing whose push was refused (it lost a push race to a model it was
    not judged against) does not count: the model served instead is the one to compare with."""

    output = "model"
    artifact_type = MODEL

    def __init__(self, evaluator: str | None = None):
        self.evaluator = evaluator

    def resolve(self, store: Any, pipeline_name: str) -> Artifact | None:
        return latest_blessed_model(store, pipeline_name, self.evaluator)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "evaluator": self.evaluator}


def latest_blessed_model(store: Any, pipeline_name: str, evaluator: str | None = None) -> Artifact | None:
    """See `LatestBlessedModel`."""
    criteria: dict[str, Any] = {"blessed": 1}
    if evaluator:
        criteria["producer_component"] = evaluator
    blessings = store.latest_artifacts(MODEL_BLESSING.name, pipeline_name, criteria)
    refused = {
        p.properties.get("blessing_uri")
        for p in store.latest_artifacts(PUSHED_MODEL.name, pipeline_name, {"push_refused": 1})
    }
    blessings = [b for b in blessings if b.uri not in refused]
    if not blessings:
        return None
    model_uri = blessings[0].properties.get("model_uri")
    for model in store.latest_artifacts(MODEL.name, pipeline_name):
        if model.uri == model_uri:
            return model
    raise MetadataError(
        f"blessing {blessings[0].uri} names model {model_uri!r}, which ML Metadata does not list "
        f"as a published Model of pipeline {pipeline_name!r}"
    )


class Resolver(PlannedNode):
    """An artifact picked from ML Metadata by `strategy` when the run is planned, as an output to wire on."""

    def __init__(self, strategy: ResolverStrategy, *, component_id: str | None = None):
        if not isinstance(strategy, ResolverStrategy):
            raise PipelineDefinitionError(
                f"Resolver strategy must be a ResolverStrategy such as LatestBlessedModel(), got {strategy!r}"
            )
        self.OUTPUTS = {strategy.output: strategy.artifact_type}
        self.strategy = strategy
        super().__init__(inputs={}, params=strategy.config(), component_id=component_id)

    def plan_outputs(self, store: Any, pipeline_name: str) -> dict[str, Artifact]:
        found = self.strategy.resolve(store, pipeline_name)
        return {} if found is None else {self.strategy.output: found}
