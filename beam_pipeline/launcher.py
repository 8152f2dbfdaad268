"""The driver: plan (cache, resolve), register executions, run the one graph, publish as commits land.

Publishing happens here, not on workers: the graph leaves a commit marker next to each finished
artifact; the driver polls for markers while the job runs and records executions and artifacts in
ML Metadata in topological order. A component whose outputs are not all committed when the job ends
is recorded FAILED and its directories are removed, so nothing half-written is ever published.

Every execution registered RUNNING is ended on every way out: FAILED when planning, building the
graph, the job or the store fails, CANCELED on Ctrl-C or SIGTERM. A launcher that is killed outright
leaves RUNNING executions behind; the next run of the pipeline finds their launcher gone and marks
them abandoned (FAILED), removing what they had half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import artifact_io, caching, errors, planner, remote_fs
from beam_pipeline.artifacts import Artifact
from beam_pipeline.compiler import ComponentPlan, build_graph, present_inputs
from beam_pipeline.dsl import Pipeline, scratch_root
from beam_pipeline.errors import BeamPipelineError, MetadataError, PipelineDefinitionError, PipelineRunError
from beam_pipeline.metadata import HEARTBEAT_INTERVAL_S, MetadataStore
from beam_pipeline.run_result import CACHED, CANCELED, COMPLETE, FAILED, RUNNING
from beam_pipeline.run_result import ComponentResult as ComponentResult  # the run's result types, re-exported
from beam_pipeline.run_result import RunResult as RunResult

log = logging.getLogger(__name__)


def default_metadata_uri(pipeline: Pipeline) -> str:
    """`<root>/metadata.sqlite` for a local root; a root on an object store has no default store."""
    if remote_fs.is_remote(pipeline.root):
        # ML Metadata's SQLite is a local file: joining it onto s3://... would name a local `s3:/...` path.
        raise MetadataError(
            f"pipeline root {pipeline.root} is on {remote_fs.scheme(pipeline.root)}://, where ML Metadata's "
            "SQLite file cannot live: pass --metadata-uri (or BEAM_PIPELINE_METADATA_URI; metadata_uri= from "
            "Python) naming a local SQLite path such as ./metadata.sqlite, or mysql://user:pw@host:3306/db"
        )
    return FileSystems.join(pipeline.root, "metadata.sqlite")


def metadata_uri_for(pipeline: Pipeline, metadata_uri: str | MetadataStore | None = None) -> str | MetadataStore:
    """The store a run of `pipeline` records into: the one given, the pipeline's own, else the default."""
    return metadata_uri or pipeline.metadata_connection or default_metadata_uri(pipeline)


def _paths(value: Any) -> list[str]:
    """Every string in a component parameter (lists and dicts included): its input paths among them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


def check_paths_reach_workers(pipeline: Pipeline, beam_args: Sequence[str]) -> None:
    """Refuse local paths the workers must read when they share no disk with this process (module files
    are fine: they are staged under the root)."""
    from runners.options import NO_SHARED_DISK

    if not any(NO_SHARED_DISK in a for a in beam_args if a.startswith("--experiments")):
        return
    local = [] if remote_fs.is_remote(pipeline.root) else [f"pipeline root {pipeline.root}"]
    for c in pipeline.ordered:
        for name, value in c.params.items():
            if name.endswith("module_file"):
                continue
            local += [f"{c.id}.{name} {p}" for p in _paths(value) if not remote_fs.is_remote(p) and os.path.exists(p)]
    if local:
        raise PipelineDefinitionError(
            "the runner's SDK workers share no disk with this machine, so they cannot read "
            + ", ".join(local)
            + ": put them on an object store (s3://..., gs://...), or for a local run let the workers share "
            "this disk with BEAM_PIPELINE_ISOLATE_WORKERS=0"
        )


def enable_filesystems(pipeline: Pipeline, beam_args: Sequence[str]) -> list[str]:
    """Make the root's and every input's filesystem reachable here; the Beam args SDK workers need too.

    (The metadata URI is not among them: ML Metadata opens SQLite or MySQL itself, never through these.)
    """
    paths = [pipeline.root, *(p for c in pipeline.ordered for p in _paths(c.params))]
    return remote_fs.enable_for(paths, [*pipeline.beam_pipeline_args, *beam_args])


@dataclasses.dataclass
class CompiledRun:
    """A pipeline compiled into one Beam graph, with its executions registered as RUNNING."""

    pipeline: Pipeline
    beam_pipeline: beam.Pipeline
    plans: dict[str, ComponentPlan]
    store: MetadataStore
    contexts: list
    result: RunResult
    start_ms: int


def compile_run(
    pipeline: Pipeline,
    beam_args: Sequence[str] = (),
    *,
    metadata_uri: str | MetadataStore | None = None,
    enable_cache: bool | None = None,
    run_id: str | None = None,
    settled: Mapping[str, tuple[ComponentPlan, ComponentResult]] | None = None,
) -> CompiledRun:
    """Plan (cache lookups, resolution), register executions and build the Beam graph; runs nothing.

    `run_id` and `settled` continue a run (see `conditional_run`): components already done in it
    keep their plan and result, their outputs treated like cached ones.
    """
    uri = metadata_uri_for(pipeline, metadata_uri)
    check_paths_reach_workers(pipeline, beam_args)
    beam_args = [*beam_args, *enable_filesystems(pipeline, beam_args)]  # before anything touches the root
    store = uri if isinstance(uri, MetadataStore) else MetadataStore(uri)
    use_cache = pipeline.enable_cache if enable_cache is None else enable_cache
    sweep_abandoned(store, pipeline.name)
    run_id = run_id or datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    contexts = store.run_contexts(pipeline.name, run_id)
    result = RunResult(
        pipeline.name,
        pipeline.root,
        run_id,
        store.uri,
        {c.id: ComponentResult(c.id, type(c).__name__) for c in pipeline.ordered},
    )
    start_ms = result.start_ms = int(time.time() * 1000)
    plans: dict[str, ComponentPlan] = {}
    try:
        for component_id, (plan, done) in (settled or {}).items():
            plans[component_id], result.components[component_id] = plan, done
        planner.plan(pipeline, store, use_cache, run_id, contexts, result, start_ms, plans)
        options = PipelineOptions(list(pipeline.beam_pipeline_args) + list(beam_args))
        runner = options.view_as(StandardOptions).runner
        if runner is None or runner.lower() in ("fnapi", "fnapirunner"):
            from runners.options import in_process_runner

            p = beam.Pipeline(runner=in_process_runner(options), options=options)
        else:
            p = beam.Pipeline(options=options)
        build_graph(p, pipeline, plans, run_id)
    except BaseException as e:
        _end_unfinished(plans, store, contexts, result, e, when="before the job started")
        raise
    return CompiledRun(pipeline, p, plans, store, contexts, result, start_ms)


def sweep_abandoned(store: MetadataStore, pipeline_name: str) -> list[int]:
    """Mark executions whose launcher died as abandoned and remove what they half-wrote; their ids."""
    swept = store.sweep_abandoned(pipeline_name)
    for execution in swept:
        log.warning(
            "execution %d (%s) was abandoned by a launcher that is gone", execution["id"], execution["component_id"]
        )
        _remove(execution["output_uris"].values())
    return [execution["id"] for execution in swept]


def run(
    pipeline: Pipeline,
    beam_args: Sequence[str] = (),
    *,
    metadata_uri: str | MetadataStore | None = None,
    enable_cache: bool | None = None,
    on_update: Callable[[RunResult], None] | None = None,
) -> RunResult:
    """Run the pipeline as one Beam job; returns per-component results or raises a BeamPipelineError.

    A pipeline with `Cond`s runs as two jobs: the unconditional part, then what its conditions allow
    (`beam_pipeline.conditional_run`).
    """
    if any(c.conditions for c in pipeline.ordered):
        from beam_pipeline import conditional_run

        return conditional_run.run_in_phases(
            pipeline, beam_args, metadata_uri=metadata_uri, enable_cache=enable_cache, on_update=on_update
        )
    compiled = compile_run(pipeline, beam_args, metadata_uri=metadata_uri, enable_cache=enable_cache)
    return execute(compiled, on_update=on_update)


def execute(
    compiled: CompiledRun,
    *,
    on_update: Callable[[RunResult], None] | None = None,
    poll_interval_s: float = 0.5,
) -> RunResult:
    """Run a compiled graph, publishing each component as its commit markers appear."""
    try:
        return _execute(compiled, on_update, poll_interval_s)
    finally:  # whatever the workers exchanged in this run (training rendezvous, ...) is of no further use
        _remove([scratch_root(compiled.pipeline.root, compiled.result.run_id)])


def _execute(compiled: CompiledRun, on_update: Callable[[RunResult], None] | None, poll_interval_s: float) -> RunResult:
    pipeline, plans, store, contexts = compiled.pipeline, compiled.plans, compiled.store, compiled.contexts
    result, start_ms, p = compiled.result, compiled.start_ms, compiled.beam_pipeline
    if not any(not plan.cached for plan in plans.values()):
        if on_update:
            on_update(result)
        return result  # everything reused: no job to run
    for plan in plans.values():
        if not plan.cached:
            result.components[plan.id].state = RUNNING
    if on_update:
        on_update(result)

    failure: list[BaseException] = []
    finished: list[Any] = []
    started: list[Any] = []

    def job() -> None:
        try:
            beam_result = p.run()
            started.append(beam_result)
            beam_result.wait_until_finish()
            finished.append(beam_result)
        except BaseException as e:  # re-raised on the driver thread below
            failure.append(e)

    thread = threading.Thread(target=job, name="beam-job", daemon=True)
    try:
        thread.start()
        last_beat = time.monotonic()
        while thread.is_alive():
            thread.join(poll_interval_s)
            if _publish_ready(pipeline, plans, store, contexts, result, start_ms) and on_update:
                on_update(result)
            if time.monotonic() - last_beat > HEARTBEAT_INTERVAL_S:
                store.heartbeat(contexts[1])
                last_beat = time.monotonic()
        _publish_ready(pipeline, plans, store, contexts, result, start_ms)
    except BaseException as e:  # Ctrl-C, SIGTERM, a store error while publishing
        _cancel(started)
        _end_unfinished(plans, store, contexts, result, e, when="while the job ran")
        if on_update:
            on_update(result)
        raise

    if finished:
        _record_busy_time(finished[0], plans, store, result)
    unfinished = [pl for pl in plans.values() if result.components[pl.id].state == RUNNING]
    if failure or unfinished:
        cause = failure[0] if failure else None
        message = _failure_message(cause, unfinished)
        for plan in unfinished:
            _fail(plan, store, contexts, result, message)
        result.error = message
        if on_update:
            on_update(result)
        raise _root_cause(cause)[0](message) from cause
    if on_update:
        on_update(result)
    return result


def _publish_ready(pipeline, plans, store, contexts, result, start_ms) -> bool:
    """Publish every running component whose outputs are committed and whose producers are published."""
    changed = False
    for c in pipeline.ordered:
        r = result.components[c.id]
        if r.state != RUNNING:
            continue
        if any(result.components[up.id].state not in (COMPLETE, CACHED) for up in c.upstream):
            continue
        plan = plans[c.id]
        markers = {out: artifact_io.read_marker(uri) for out, uri in plan.output_uris.items()}
        if any(m is None for m in markers.values()):
            continue
        outputs = {out: Artifact(c.OUTPUTS[out], plan.output_uris[out], m["properties"]) for out, m in markers.items()}
        present = present_inputs(c, plans)
        inputs = {name: [result.components[ch.producer.id].artifacts[ch.name]] for name, ch in present.items()}
        end_ms = max(m["committed_at_ms"] for m in markers.values())
        began_ms = max([start_ms] + [result.components[up.id].end_time_ms or start_ms for up in c.upstream])
        external = c.external_fingerprint(inputs) if c.FINGERPRINT_AFTER_RUN else plan.external
        key = caching.cache_key(c, inputs, resolved=plan.resolved, external=external, modules=plan.modules)
        store.finish_execution(
            plan.execution_id,
            state=mlmd_pb2.Execution.COMPLETE,
            inputs=planner.with_resolved(inputs, plan),
            outputs=outputs,
            contexts=contexts,
            end_time_ms=end_ms,
            start_time_ms=began_ms,
            cache_key=key,
        )
        r.state, r.artifacts, r.end_time_ms = COMPLETE, outputs, end_ms
        changed = True
    return changed


def _record_busy_time(beam_result: Any, plans, store: MetadataStore, result: RunResult) -> None:
    """Per-component processing time from the runner's per-transform metrics, where it reports them.

    In one fused graph a component has no wall-clock span of its own; the time the runner spent in
    its transforms is the honest measure. Runners without these metrics leave it unset.
    """
    from apache_beam.metrics import monitoring_infos

    try:
        infos = beam_result.monitoring_infos()
    except (AttributeError, NotImplementedError):
        return
    busy_ms: dict[str, float] = {}
    for info in infos:
        if not info.urn.startswith("beam:metric:pardo_execution_time:"):
            continue
        label = info.labels.get("PTRANSFORM", "")
        owners = [cid for cid in plans if label == cid or label.startswith((cid + "/", cid + "."))]
        if owners:
            component_id = max(owners, key=len)
            busy_ms[component_id] = busy_ms.get(component_id, 0) + monitoring_infos.extract_counter_value(info)
    for component_id, ms in busy_ms.items():
        r = result.components[component_id]
        if r.state == COMPLETE:
            r.busy_s = ms / 1000
            store.set_execution_property(r.execution_id, "busy_s", r.busy_s)


def _remove(uris) -> None:
    """Delete each output directory with everything under it, locally or on an object store."""
    for uri in uris:
        if remote_fs.is_remote(uri):
            # An object store has no directories: exists() is False for a prefix, and deleting the bare
            # name removes one object at most. `<uri>/` deletes every object under it (none is no error).
            FileSystems.delete([uri.rstrip("/") + "/"])
        elif FileSystems.exists(uri):
            FileSystems.delete([uri])


def _fail(plan: ComponentPlan, store, contexts, result, message: str, *, canceled: bool = False) -> None:
    _remove(plan.output_uris.values())
    state = mlmd_pb2.Execution.CANCELED if canceled else mlmd_pb2.Execution.FAILED
    store.finish_execution(plan.execution_id, state=state, inputs={}, outputs={}, contexts=contexts, error=message)
    result.components[plan.id].state = CANCELED if canceled else FAILED


def _cancel(started: list[Any]) -> None:
    """Ask the runner to stop the job; in-process runners cannot, and end with this process."""
    for beam_result in started:
        try:
            beam_result.cancel()
        except NotImplementedError:
            pass


def _end_unfinished(plans, store, contexts, result, cause: BaseException, *, when: str) -> None:
    """End every execution this run registered and did not finish: CANCELED on an interrupt, else FAILED.

    A store that fails again here is left as it is: the original error is the one to report, and
    the next run of the pipeline marks the leftovers abandoned.
    """
    canceled = isinstance(cause, (KeyboardInterrupt, SystemExit))
    what = "canceled" if canceled else "failed"
    reason = str(cause).strip() or type(cause).__name__
    message = f"{what} {when}: {type(cause).__name__}: {reason}"
    for plan in plans.values():
        r = result.components[plan.id]
        if plan.execution_id is None or plan.cached or r.state in (COMPLETE, CACHED, FAILED, CANCELED):
            continue
        try:
            _fail(plan, store, contexts, result, message, canceled=canceled)
        except MetadataError as e:
            log.error("could not record %s as %s: %s", plan.id, what, e)
            r.state = CANCELED if canceled else FAILED
    result.error = message


def _failure_message(cause: BaseException | None, unfinished: list[ComponentPlan]) -> str:
    names = ", ".join(pl.id for pl in unfinished) or "none"
    if cause is None:
        return f"the job ended but these components never committed their outputs: {names}"
    return f"{_root_cause(cause)[1]}\n(not completed: {names})"


# How a portable runner's job service reports one of our errors raised on an SDK worker.
_OUR_ERROR = re.compile(r"^beam_pipeline\.errors\.(\w+): ")


def _root_cause(cause: BaseException | None) -> tuple[type[BeamPipelineError], str]:
    """The error type to raise for a failed job and its one-line message: what a worker raised, also
    when a portable runner sent it back as text."""
    if cause is None:
        return PipelineRunError, ""
    text = str(cause).strip() or type(cause).__name__
    # Beam appends the failing step (and on portable runners whole tracebacks) to the message.
    text = _BEAM_SUFFIX.sub("", text).strip()
    if isinstance(cause, BeamPipelineError):
        return type(cause), text
    line = _root_line(text)
    found = _OUR_ERROR.match(line)
    named = getattr(errors, found.group(1), None) if found else None
    kind = named if isinstance(named, type) and issubclass(named, BeamPipelineError) else PipelineRunError
    return kind, _OUR_ERROR.sub("", line, count=1)


_BEAM_SUFFIX = re.compile(r"\s*\[while running '[^']*'\]\s*$")


def _root_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        for name in (
            "InputDataError",
            "UserModuleError",
            "AnomaliesFoundError",
            "PipelineDefinitionError",
            "TrainingClusterError",
        ):
            if name + ":" in line:
                return line.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text
