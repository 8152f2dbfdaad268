"""Run a pipeline with `Cond`s: the unconditional part, then the components whose conditions hold, as one run.

A condition reads a property of an artifact made in the same run (a blessing, a drift measure), so
it can only be judged once that artifact is published: the launcher runs the components outside any
`Cond` (and nothing downstream of one) as one Beam job, judges each condition on the published
artifacts, then runs the rest as a second job of the same run, the first job's components treated
like cached ones. A component whose condition fails, and everything downstream of it, is recorded
in ML Metadata as CANCELED with the reason ("skipped: ...") and is SKIPPED in the run's result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import launcher, planner
from beam_pipeline.dsl import Component, Pipeline
from beam_pipeline.errors import PipelineDefinitionError
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.run_result import ComponentResult

log = logging.getLogger(__name__)

SKIPPED = "SKIPPED"


def run_in_phases(
    pipeline: Pipeline,
    beam_args: Sequence[str] = (),
    *,
    metadata_uri: str | MetadataStore | None = None,
    enable_cache: bool | None = None,
    on_update: Callable[[launcher.RunResult], None] | None = None,
) -> launcher.RunResult:
    """See the module docstring."""
    conditional = _conditional(pipeline)
    for c in pipeline.ordered:
        for predicate in c.conditions:
            if predicate.channel.producer.id in conditional:
                raise PipelineDefinitionError(
                    f"{c.id}: its condition reads {predicate.channel.producer.id}, which is itself conditional; "
                    "a condition must read an artifact of the pipeline's unconditional part"
                )
    first = _subset(pipeline, [c for c in pipeline.ordered if c.id not in conditional])
    uri = launcher.metadata_uri_for(pipeline, metadata_uri)
    store = uri if isinstance(uri, MetadataStore) else MetadataStore(uri)
    compiled = launcher.compile_run(first, beam_args, metadata_uri=store, enable_cache=enable_cache)
    done = launcher.execute(compiled, on_update=on_update)

    skipped: dict[str, str] = {}
    for c in pipeline.ordered:  # topological: a producer's fate is known before its consumers'
        if c.id not in conditional:
            continue
        failed = [
            p for p in c.conditions if not p.holds(done.artifact(p.channel.producer.id, p.channel.name).properties)
        ]
        if failed:
            skipped[c.id] = f"condition {failed[0]} does not hold"
            continue
        upstream = next((up.id for up in c.upstream if up.id in skipped), None)
        if upstream is not None:
            skipped[c.id] = f"upstream {upstream} was skipped"

    settled = {
        cid: (dataclasses.replace(plan, cached_outputs=dict(done.components[cid].artifacts)), done.components[cid])
        for cid, plan in compiled.plans.items()
    }
    rest = [c for c in pipeline.ordered if c.id not in skipped]
    if len(rest) > len(first.ordered):
        second = launcher.compile_run(
            _subset(pipeline, rest),
            beam_args,
            metadata_uri=store,
            enable_cache=enable_cache,
            run_id=done.run_id,
            settled=settled,
        )
        started_ms = done.start_ms
        done = launcher.execute(second, on_update=on_update)
        done.start_ms = started_ms  # the run began with the first job
    _record_skipped(pipeline, store, done, skipped, compiled.contexts)
    if on_update:
        on_update(done)
    return done


def _conditional(pipeline: Pipeline) -> set[str]:
    """Components in a `Cond`, and everything downstream of one."""
    found: set[str] = set()
    for c in pipeline.ordered:
        if c.conditions or any(up.id in found for up in c.upstream):
            found.add(c.id)
    return found


def _subset(pipeline: Pipeline, components: list[Component]) -> Pipeline:
    return Pipeline(
        pipeline.name,
        pipeline.root,
        components,
        metadata_connection=pipeline.metadata_connection,
        enable_cache=pipeline.enable_cache,
        beam_pipeline_args=pipeline.beam_pipeline_args,
    )


def _record_skipped(pipeline, store: MetadataStore, result: launcher.RunResult, skipped: dict[str, str], contexts):
    for c in pipeline.ordered:
        if c.id not in skipped:
            continue
        reason = f"skipped: {skipped[c.id]}"
        execution_id = planner.register(store, c, pipeline.name, result.run_id, contexts)
        store.finish_execution(
            execution_id, state=mlmd_pb2.Execution.CANCELED, inputs={}, outputs={}, contexts=contexts, error=reason
        )
        result.components[c.id] = ComponentResult(c.id, type(c).__name__, SKIPPED, execution_id)
        log.info("%s: %s", c.id, reason)
