"""Plan a run: per component, reuse its outputs from the cache, settle it (Importer, Resolver) or register it to run."""

from __future__ import annotations

import logging
from typing import Any

from apache_beam.io.filesystems import FileSystems
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import caching, staging
from beam_pipeline.artifacts import Artifact
from beam_pipeline.compiler import ComponentPlan, present_inputs
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.run_result import CACHED, COMPLETE

log = logging.getLogger(__name__)


def plan(pipeline, store, use_cache, run_id, contexts, result, start_ms, plans: dict[str, ComponentPlan]) -> None:
    """Decide per component: reuse (CACHED, recorded now) or run (registered RUNNING). Fills `plans`.

    Filled in place so that, when planning fails half-way, the caller can end what was registered.
    """
    for c in pipeline.ordered:
        if c.id in plans:  # settled earlier in this run
            continue
        if c.PLANNED:
            _settle(c, pipeline, store, run_id, contexts, result, start_ms, plans)
            continue
        present = present_inputs(c, plans)
        input_static = {n: plans[ch.producer.id].static_outputs.get(ch.name, {}) for n, ch in present.items()}
        plan = ComponentPlan(c, c.static_outputs(input_static), c.resolve(store, pipeline.name))
        plan.modules = caching.module_digests(c)
        plan.staged_modules = staging.stage_modules(pipeline.root, c)
        plans[c.id] = plan
        inputs = input_artifacts(present, plans)
        plan.external = c.external_fingerprint(inputs)
        cache_on = use_cache if c.enable_cache is None else c.enable_cache
        if cache_on and inputs is not None and not c.always_run():
            key = caching.cache_key(c, inputs, resolved=plan.resolved, external=plan.external, modules=plan.modules)
            hit = store.cached_outputs(key, type(c).__name__)
            if hit is not None:
                original_id, plan.cached_outputs = hit
                execution_id = register(store, c, pipeline.name, run_id, contexts, cache_key=key)
                if plan.staged_modules:
                    store.annotate_execution(execution_id, staged_modules=plan.staged_modules)
                store.finish_execution(
                    execution_id,
                    state=mlmd_pb2.Execution.CACHED,
                    inputs=with_resolved(inputs, plan),
                    outputs=plan.cached_outputs,
                    contexts=contexts,
                    start_time_ms=start_ms,
                )
                r = result.components[c.id]
                r.state, r.execution_id, r.artifacts = CACHED, execution_id, plan.cached_outputs
                r.end_time_ms = start_ms
                log.info("%s: reusing outputs of execution %d", c.id, original_id)
                continue
        plan.execution_id = register(store, c, pipeline.name, run_id, contexts)
        result.components[c.id].execution_id = plan.execution_id
        plan.output_uris = {
            out: FileSystems.join(pipeline.root, c.id, out, str(plan.execution_id)) for out in c.OUTPUTS
        }
        store.annotate_execution(plan.execution_id, output_uris=plan.output_uris, staged_modules=plan.staged_modules)


def register(store: MetadataStore, c, pipeline_name: str, run_id: str, contexts, cache_key: str = "") -> int:
    """Register an execution of component `c` in this run (RUNNING until finished); its id."""
    return store.start_execution(
        type(c).__name__,
        c.id,
        pipeline_name=pipeline_name,
        run_id=run_id,
        config=c.exec_properties(),
        cache_key=cache_key,
        contexts=contexts,
    )


def _settle(c, pipeline, store, run_id, contexts, result, start_ms, plans: dict[str, ComponentPlan]) -> None:
    """An Importer's or Resolver's outputs, decided now and recorded as a COMPLETE execution."""
    plan = plans[c.id] = ComponentPlan(c, {}, {})
    outputs = c.plan_outputs(store, pipeline.name)
    plan.static_outputs = {name: _static_of(a) for name, a in outputs.items()}
    plan.execution_id = register(store, c, pipeline.name, run_id, contexts)
    store.finish_execution(
        plan.execution_id,
        state=mlmd_pb2.Execution.COMPLETE,
        inputs={},
        outputs=outputs,
        contexts=contexts,
        start_time_ms=start_ms,
        end_time_ms=start_ms,
    )
    plan.cached_outputs = outputs
    r = result.components[c.id]
    r.state, r.execution_id, r.artifacts, r.end_time_ms = COMPLETE, plan.execution_id, outputs, start_ms
    found = ", ".join(f"{n}={a.uri}" for n, a in outputs.items()) or "nothing"
    log.info("%s: %s", c.id, found)


def _static_of(artifact: Artifact) -> dict[str, Any]:
    """What a consumer may ask at compile time about an artifact that already exists."""
    static: dict[str, Any] = {}
    if artifact.split_names:
        static["splits"] = artifact.split_names
    if artifact.properties.get("payload_format"):
        static["payload_format"] = artifact.properties["payload_format"]
    return static


def input_artifacts(present: dict[str, Any], plans) -> dict[str, list[Artifact]] | None:
    """The artifacts of a component's present inputs (`present_inputs`) when all are already known
    (their producers were cached), else None."""
    inputs = {}
    for name, ch in present.items():
        producer = plans[ch.producer.id]
        if not producer.cached:
            return None
        inputs[name] = [producer.cached_outputs[ch.name]]
    return inputs


def with_resolved(inputs: dict[str, list[Artifact]], plan: ComponentPlan) -> dict[str, list[Artifact]]:
    # A resolved artifact that is also a regular input (e.g. a cached model that is its own
    # baseline) is linked once: ML Metadata allows one INPUT event per (execution, artifact).
    linked = {a.id for arts in inputs.values() for a in arts}
    extra = {
        k: [v] for k, v in plan.resolved.items() if isinstance(v, Artifact) and v.id is not None and v.id not in linked
    }
    return {**inputs, **extra}
