"""Compile a Pipeline into ONE beam.Pipeline.

Components are applied in topological order to the in-graph values of their inputs; each output
gets a commit step that waits for the component's `publish()` signal, fingerprints the files and
writes the commit marker the driver publishes from. A consumer starts after its producers committed:
small values pass a gate in the graph, bulk Examples are read back from the committed Parquet (only
the splits the consumer reads), so no stage boundary holds a whole split. Cached components are not
applied: their artifacts are loaded back into the graph only where a running component consumes them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import apache_beam as beam

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import COMMIT_MARKER, EXAMPLES, Artifact, ArtifactType
from beam_pipeline.dsl import Channel, Component, ComponentContext, Pipeline
from beam_pipeline.errors import PipelineDefinitionError


@dataclasses.dataclass
class ComponentPlan:
    """What the driver decided for one component before the graph is built."""

    component: Component
    static_outputs: dict[str, dict[str, Any]]
    resolved: dict[str, Any]
    cached_outputs: dict[str, Artifact] | None = None  # set when reused from the cache
    execution_id: int | None = None
    output_uris: dict[str, str] = dataclasses.field(default_factory=dict)
    # Computed once per run by the launcher, for the cache key at plan and at publish time.
    external: str = ""
    modules: dict[str, str] = dataclasses.field(default_factory=dict)
    staged_modules: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.component.id

    @property
    def cached(self) -> bool:
        return self.cached_outputs is not None


def present_inputs(component: Component, plans: dict[str, ComponentPlan]) -> dict[str, Channel]:
    """The inputs that carry an artifact this run.

    Left out: an input whose producer settled it to nothing (a Resolver that found no artifact;
    a required one fails the plan), and a settled input repeating another input's artifact (the
    candidate model resolved as its own baseline), which adds nothing and would stay uncached.
    """
    known = {
        name: plans[ch.producer.id].cached_outputs.get(ch.name)
        for name, ch in component.inputs.items()
        if plans[ch.producer.id].cached
    }
    present: dict[str, Channel] = {}
    for name, ch in component.inputs.items():
        producer = plans[ch.producer.id]
        if producer.cached and known[name] is None:
            if not component.INPUTS[name].optional:
                raise PipelineDefinitionError(
                    f"{component.id}: input {name!r} comes from {ch.producer.id}, which found no "
                    f"{ch.type.name} this run, and {component.id} cannot run without it"
                )
            continue
        if producer.component.PLANNED and any(
            other != name and a is not None and a.id is not None and a.id == known[name].id
            for other, a in known.items()
        ):
            continue
        present[name] = ch
    return present


def _merge_properties(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
    return merged


class _Commit(beam.DoFn):
    """Runs once per output after its files are complete: fingerprint, then write the commit marker.

    On an object store the fingerprint comes from the listing and the store's checksums, so a
    commit downloads nothing; on local disk it hashes the bytes (see `artifact_io.fingerprint_tree`).
    """

    def __init__(self, atype: ArtifactType, uri: str, producer: str, pipeline_name: str):
        self._atype, self._uri, self._producer, self._pipeline = atype, uri, producer, pipeline_name

    def process(self, _, manifests):
        props = _merge_properties(list(manifests))
        files = artifact_io.payload_files(self._uri)  # one listing for the fingerprint and the manifest
        props.update(
            fingerprint=artifact_io.fingerprint_tree(self._uri, files),
            producer_component=self._producer,
            pipeline_name=self._pipeline,
        )
        marker = {
            "properties": props,
            "committed_at_ms": int(time.time() * 1000),
            "files": artifact_io.manifest(self._uri, files),
        }
        artifact_io.write_text_atomic(artifact_io.join(self._uri, COMMIT_MARKER), json.dumps(marker, sort_keys=True))
        yield Artifact(self._atype, self._uri, props)


def _pass(element, _committed):
    return element


def _gate(value: Any, committed: beam.PCollection, label: str) -> Any:
    """Hold a small in-graph input back until its producer committed, so a failure never strands upstream work.

    The side input only orders the stages: when a component fails, everything upstream of it is
    already committed and is reused on resume. (Bulk Examples are read from the commit instead.)
    """
    if isinstance(value, dict):
        return {k: _gate(v, committed, f"{label}.{k}") for k, v in value.items()}
    if value is committed:
        return value
    # The Reshuffle keeps a runner from fusing the gate into the producer's own stage, whose
    # output the commit (the side input) depends on: fused, the stage would wait for itself.
    return (
        value
        | f"{label}.Barrier" >> beam.Reshuffle()
        | f"{label}.AfterCommit" >> beam.Map(_pass, beam.pvalue.AsSingleton(committed))
    )


def _reader(artifact: beam.PCollection, label: str):
    """split -> a new read of that split of the artifact's files each call (a consumer may read twice)."""
    reads: dict[str, int] = {}

    def read(split: str) -> beam.PCollection:
        reads[split] = reads.get(split, 0) + 1
        suffix = "" if reads[split] == 1 else f"#{reads[split]}"
        return artifact | f"{label}.Read[{split}]{suffix}" >> artifact_io.ReadSplit(split)

    return read


def _commit_factory(p: beam.Pipeline, component: Component, plan: ComponentPlan, pipeline_name: str):
    def commit(out: str, properties: beam.PCollection) -> beam.PCollection:
        return (
            p
            | f"{component.id}.{out}.CommitStart" >> beam.Create([None])
            | f"{component.id}.{out}.Commit"
            >> beam.ParDo(
                _Commit(component.OUTPUTS[out], plan.output_uris[out], component.id, pipeline_name),
                beam.pvalue.AsList(properties),
            )
        )

    return commit


def build_graph(p: beam.Pipeline, pipeline: Pipeline, plans: dict[str, ComponentPlan], run_id: str) -> None:
    """Apply every planned component to `p`."""
    values: dict[tuple[str, str], Any] = {}
    committed: dict[tuple[str, str], beam.PCollection] = {}
    present = {c.id: present_inputs(c, plans) for c in pipeline.ordered if not plans[c.id].cached}
    needed = {(ch.producer.id, ch.name) for channels in present.values() for ch in channels.values()}

    def cached_value(producer: ComponentPlan, out: str, load: bool = True):
        key = (producer.id, out)
        artifact = producer.cached_outputs[out]
        if key not in committed:
            committed[key] = p | f"{producer.id}.{out}.Cached" >> beam.Create([artifact])
        if load and key not in values:
            loader = artifact_io.LOADERS.get(artifact.type.name)
            values[key] = loader(p, artifact, f"{producer.id}.{out}.Load") if loader else committed[key]
        return values.get(key)

    for component in pipeline.ordered:
        plan = plans[component.id]
        if plan.cached:
            for out in component.OUTPUTS:
                if (component.id, out) in needed:
                    cached_value(plan, out, load=False)
            continue
        inputs, committed_inputs, input_static, input_uris, readers = {}, {}, {}, {}, {}
        for name, ch in present[component.id].items():
            key = (ch.producer.id, ch.name)
            producer = plans[ch.producer.id]
            input_static[name] = producer.static_outputs.get(ch.name, {})
            if producer.cached:
                artifact = producer.cached_outputs[ch.name]
                input_uris[name], payload, splits = artifact.uri, artifact.properties.get("payload_format"), None
                if ch.type == EXAMPLES:
                    splits = artifact.split_names
            else:
                input_uris[name] = producer.output_uris[ch.name]
                payload, splits = input_static[name].get("payload_format"), input_static[name].get("splits")
            committed_inputs[name] = committed[key]
            if ch.type == EXAMPLES and (
                producer.cached or (artifact_io.rereadable(payload) and not component.FUSE_WITH_PRODUCERS)
            ):
                # Read from the committed files, only the splits read here: streamed, never held whole.
                readers[name] = _reader(committed[key], f"{component.id}.{name}")
                inputs[name] = {s: readers[name](s) for s in component.splits_read(name, splits)}
                continue
            value = cached_value(producer, ch.name) if producer.cached else values[key]
            if ch.type == EXAMPLES and splits is not None:
                value = {s: value[s] for s in component.splits_read(name, splits)}
            if producer.cached or component.FUSE_WITH_PRODUCERS:
                inputs[name] = value
            else:
                inputs[name] = _gate(value, committed[key], f"{component.id}.{name}")
        ctx = ComponentContext(
            pipeline_name=pipeline.name,
            pipeline_root=pipeline.root,
            run_id=run_id,
            execution_id=plan.execution_id,
            output_uris=plan.output_uris,
            input_static=input_static,
            output_static=plan.static_outputs,
            resolved=plan.resolved,
            committed_inputs=committed_inputs,
            input_uris=input_uris,
            commit_factory=_commit_factory(p, component, plan, pipeline.name),
            staged_modules=plan.staged_modules,
            readers=readers,
        )
        component.bind(ctx)
        try:
            result = (inputs or p) | component.id >> component
        finally:
            component.bind(None)
            component.pipeline = None  # Beam pins a transform to its pipeline; a Pipeline may run again
        result = result or {}
        missing = set(component.OUTPUTS) - set(ctx.committed_outputs)
        if missing:
            raise PipelineDefinitionError(f"{component.id}: outputs {sorted(missing)} were never published")
        for out, atype in component.OUTPUTS.items():
            key = (component.id, out)
            committed[key] = ctx.committed_outputs[out]
            values[key] = result.get(out) if artifact_io.has_data_value(atype) else committed[key]
            if values[key] is None:
                raise PipelineDefinitionError(f"{component.id}: expand() returned no value for data output {out!r}")
