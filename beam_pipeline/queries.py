"""Questions asked of ML Metadata after the fact: which runs, which executions, what a model was made from.

Everything here reads the store only (plus the artifact files it points at), so it works the same on
a notebook, the CLI and the run report, on SQLite or MySQL. Tables come back as pandas DataFrames.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import artifact_io, remote_fs
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
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import (
    ABANDONED,
    ABANDONED_PREFIX,
    PIPELINE_CONTEXT,
    RUN_CONTEXT,
    STALE_HEARTBEAT_S,
    STATE_NAMES,
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


# -- opening -----------------------------------------------------------------------------------------
def open_store(store: MetadataStore | str) -> MetadataStore:
    """A store from a URI, refusing to create an empty SQLite file where the user mistyped a path."""
    if isinstance(store, MetadataStore):
        return store
    if not store.startswith("mysql://"):
        path = store[len("sqlite://") :] if store.startswith("sqlite://") else store
        if "://" not in path and not os.path.isfile(path):  # a remote path: MetadataStore says what to pass
            raise MetadataError(f"no ML Metadata store at {path}: run a pipeline first, or pass --metadata-uri")
    return MetadataStore(store)


def store_uri(metadata_uri: str | None, pipeline_root: str | None) -> str:
    """The store a command means: an explicit URI, else `<pipeline root>/metadata.sqlite`."""
    if metadata_uri:
        return metadata_uri
    if pipeline_root and remote_fs.is_remote(pipeline_root):
        raise MetadataError(
            f"pipeline root {pipeline_root} is on {remote_fs.scheme(pipeline_root)}://, where no SQLite store can "
            "live: pass --metadata-uri (or BEAM_PIPELINE_METADATA_URI), the local SQLite path or mysql://... URI "
            "the run recorded into"
        )
    if pipeline_root:
        return os.path.join(os.path.abspath(pipeline_root), "metadata.sqlite")
    raise MetadataError(
        "say which ML Metadata store to read: --metadata-uri (or BEAM_PIPELINE_METADATA_URI) or --pipeline-root"
    )


# -- small readers -----------------------------------------------------------------------------------
def prop_value(e: mlmd_pb2.Execution | mlmd_pb2.Artifact, name: str) -> Any:
    """A (custom) property of an MLMD record as a plain Python value, None if unset."""
    for props in (e.properties, e.custom_properties):
        if name in props:
            v = props[name]
            kind = v.WhichOneof("value")
            return getattr(v, kind) if kind else None
    return None


def _timestamp(ms: int | None) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _duration_s(e: mlmd_pb2.Execution) -> float | None:
    start, end = prop_value(e, "start_time_ms"), prop_value(e, "end_time_ms")
    if not start or not end:
        return None
    return max(0.0, (end - start) / 1000)


def state_name(e: mlmd_pb2.Execution) -> str:
    """The execution's state; ABANDONED for one whose launcher died before it finished."""
    error = prop_value(e, "error")
    if e.last_known_state == mlmd_pb2.Execution.FAILED and str(error or "").startswith(ABANDONED_PREFIX):
        return ABANDONED
    return STATE_NAMES.get(e.last_known_state, "UNKNOWN")


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


def execution_config(e: mlmd_pb2.Execution) -> dict[str, Any]:
    raw = prop_value(e, "config")
    return json.loads(raw) if raw else {}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys (`splits.train`), so each setting is one column."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def get_artifact(store: MetadataStore, artifact_id: int, type_name: str | None = None) -> Artifact:
    """One artifact by id, checked to be of `type_name` when given."""
    found = store.get_artifacts([artifact_id])
    if not found:
        raise MetadataError(f"no artifact with id {artifact_id} in {store.uri}")
    artifact = found[0]
    if type_name and artifact.type.name != type_name:
        raise MetadataError(f"artifact {artifact_id} is of type {artifact.type.name}, not {type_name}")
    return artifact


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
    seen_artifacts, seen_executions = {artifact_id}, set()
    executions_found: list[mlmd_pb2.Execution] = []
    artifacts_found: list[Artifact] = []
    frontier = [artifact_id]
    while frontier:
        events = store.mlmd.get_events_by_artifact_ids(frontier)
        made_by = sorted({ev.execution_id for ev in events if ev.type == mlmd_pb2.Event.OUTPUT} - seen_executions)
        if not made_by:
            break
        seen_executions.update(made_by)
        found = store.mlmd.get_executions_by_id(made_by)
        # Cached executions only repeat what the original producer read; follow the original.
        originals = [e for e in found if e.last_known_state != mlmd_pb2.Execution.CACHED] or found
        executions_found.extend(sorted(originals, key=lambda e: e.id))
        read = store.mlmd.get_events_by_execution_ids([e.id for e in originals])
        new_ids = sorted({ev.artifact_id for ev in read if ev.type == mlmd_pb2.Event.INPUT} - seen_artifacts)
        seen_artifacts.update(new_ids)
        new_artifacts = store.get_artifacts(new_ids) if new_ids else []
        artifacts_found.extend(sorted(new_artifacts, key=lambda a: a.id or 0))
        frontier = [a.id for a in new_artifacts if a.type.name != MODEL.name]
    return executions_found, artifacts_found


def _outputs_of(store: MetadataStore, execution_id: int) -> dict[str, Artifact]:
    return store.execution_artifacts(execution_id)[1]


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


def read_statistics(artifact: Artifact) -> dict[str, Any]:
    """Split name -> DatasetFeatureStatisticsList of an ExampleStatistics artifact."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    return {
        split: artifact_io.read_proto(
            artifact_io.split_file(artifact.uri, split, artifact_io.STATS_FILE),
            statistics_pb2.DatasetFeatureStatisticsList,
        )
        for split in artifact.split_names
    }


def read_schema(artifact: Artifact) -> Any:
    from tensorflow_metadata.proto.v0 import schema_pb2

    return artifact_io.read_proto(artifact_io.join(artifact.uri, artifact_io.SCHEMA_FILE), schema_pb2.Schema)


def read_anomalies(artifact: Artifact) -> dict[str, Any]:
    """Split name -> Anomalies proto of an ExampleAnomalies artifact."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    return {
        split: artifact_io.read_proto(
            artifact_io.split_file(artifact.uri, split, artifact_io.ANOMALIES_FILE), anomalies_pb2.Anomalies
        )
        for split in artifact.split_names
    }


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


def _numeric_summary(feature: Any) -> dict[str, Any]:
    num = feature.num_stats
    common = num.common_stats
    total = common.num_non_missing + common.num_missing
    median = None
    for q in num.histograms:
        if q.type == q.QUANTILES and q.buckets:
            median = q.buckets[len(q.buckets) // 2].low_value
    return {
        "count": common.num_non_missing,
        "missing_pct": 100.0 * common.num_missing / total if total else 0.0,
        "mean": num.mean,
        "std": num.std_dev,
        "min": num.min,
        "median": median,
        "max": num.max,
        "zeros_pct": 100.0 * num.num_zeros / common.num_non_missing if common.num_non_missing else 0.0,
        "unique": None,
        "top_value": None,
    }


def _string_summary(feature: Any) -> dict[str, Any]:
    s = feature.string_stats
    common = s.common_stats
    total = common.num_non_missing + common.num_missing
    top = s.top_values[0] if s.top_values else None
    return {
        "count": common.num_non_missing,
        "missing_pct": 100.0 * common.num_missing / total if total else 0.0,
        "mean": None,
        "std": None,
        "min": None,
        "median": None,
        "max": None,
        "zeros_pct": None,
        "unique": s.unique,
        "top_value": f"{top.value} ({int(top.frequency)})" if top else None,
    }


def feature_name(feature: Any) -> str:
    return feature.name or ".".join(feature.path.step)


def statistics_frame(stats: Any) -> pd.DataFrame:
    """One row per feature of a DatasetFeatureStatisticsList: the numbers a person scans first."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    rows = []
    for dataset in stats.datasets:
        for feature in dataset.features:
            kind = statistics_pb2.FeatureNameStatistics.Type.Name(feature.type)
            summary = _numeric_summary(feature) if feature.HasField("num_stats") else _string_summary(feature)
            rows.append({"feature": feature_name(feature), "type": kind, **summary})
    columns = [
        "feature",
        "type",
        "count",
        "missing_pct",
        "mean",
        "std",
        "min",
        "median",
        "max",
        "zeros_pct",
        "unique",
        "top_value",
    ]
    return pd.DataFrame(rows, columns=columns).sort_values("feature").reset_index(drop=True)


def schema_frame(schema: Any) -> pd.DataFrame:
    """One row per schema feature: type, presence, valency and domain."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    domains = {d.name: list(d.value) for d in schema.string_domain}
    rows = []
    for f in schema.feature:
        if f.HasField("domain"):
            domain = f"{f.domain} ({len(domains.get(f.domain, []))} values)"
        elif f.HasField("int_domain"):
            domain = f"int [{f.int_domain.min}, {f.int_domain.max}]" if f.int_domain.HasField("max") else "int"
        elif f.HasField("float_domain"):
            domain = "float"
        else:
            domain = ""
        if f.HasField("shape"):
            valency = "fixed " + "x".join(str(d.size) for d in f.shape.dim) if f.shape.dim else "scalar"
        elif f.HasField("value_count"):
            valency = f"{f.value_count.min}..{f.value_count.max}" if f.value_count.max else f">= {f.value_count.min}"
        else:
            valency = ""
        rows.append(
            {
                "feature": f.name,
                "type": schema_pb2.FeatureType.Name(f.type),
                "presence": "required" if f.presence.min_fraction == 1.0 else "optional",
                "valency": valency,
                "domain": domain,
            }
        )
    return pd.DataFrame(rows, columns=["feature", "type", "presence", "valency", "domain"])


def anomalies_frame(anomalies: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (split, feature) anomaly, plus dataset-level ones under feature '(dataset)'."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    rows = []
    for split, proto in anomalies.items():
        for name, info in sorted(proto.anomaly_info.items()):
            rows.append(
                {
                    "split": split,
                    "feature": name,
                    "severity": anomalies_pb2.AnomalyInfo.Severity.Name(info.severity),
                    "short_description": info.short_description,
                    "description": info.description,
                }
            )
        if proto.HasField("dataset_anomaly_info"):
            info = proto.dataset_anomaly_info
            rows.append(
                {
                    "split": split,
                    "feature": "(dataset)",
                    "severity": anomalies_pb2.AnomalyInfo.Severity.Name(info.severity),
                    "short_description": info.short_description,
                    "description": info.description,
                }
            )
    return pd.DataFrame(rows, columns=["split", "feature", "severity", "short_description", "description"])


# -- evaluation metrics ------------------------------------------------------------------------------
OVERALL = "Overall"


def _metric_value(value: Mapping[str, Any]) -> float | None:
    if "doubleValue" in value:
        return float(value["doubleValue"])
    bounded = value.get("boundedValue")
    if isinstance(bounded, Mapping) and "value" in bounded:
        return float(bounded["value"])
    return None


def _slice_name(slice_key: tuple) -> str:
    return " & ".join(f"{k}={v}" for k, v in slice_key) if slice_key else OVERALL


def load_eval_result(uri: str) -> Any:
    """tfma.load_eval_result, choosing the candidate's metrics when a baseline was evaluated too."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(uri)
    specs = list(result.config.model_specs) if result.config else []
    if len(specs) > 1:
        candidate = next(s.name for s in specs if not s.is_baseline)
        result = tfma.load_eval_result(uri, model_name=candidate)
    return result


def metrics_frame(eval_result: Any, slice_column: str | None = None) -> pd.DataFrame:
    """Rows: slices (all, or those of one column sorted by value); columns: slice, slice_value, metrics."""
    rows = []
    columns_seen: set[str] = set()
    for slice_key, by_output in eval_result.slicing_metrics:
        columns_seen.update(k for k, _ in slice_key)
        if slice_column is not None and [k for k, _ in slice_key] != [slice_column]:
            continue
        row: dict[str, Any] = {"slice": _slice_name(slice_key), "slice_value": slice_key[0][1] if slice_key else None}
        prefixes = len(by_output) > 1 or any(len(sub) > 1 for sub in by_output.values())
        for output_name, by_sub_key in by_output.items():
            for sub_key, metrics in by_sub_key.items():
                for name, value in metrics.items():
                    number = _metric_value(value)
                    if number is None:
                        continue
                    label = "/".join(p for p in (output_name, sub_key, name) if p) if prefixes else name
                    row[label] = number
        rows.append(row)
    if slice_column is not None and not rows:
        raise MetadataError(
            f"the evaluation has no slices by {slice_column!r}; sliced columns are {sorted(columns_seen) or 'none'}"
        )
    frame = pd.DataFrame(rows)
    frame["slice_value"] = pd.Series([r["slice_value"] for r in rows], dtype=object)
    order = sorted(
        range(len(rows)),
        key=lambda i: (rows[i]["slice"] != OVERALL, _slice_order(rows[i]["slice"], rows[i]["slice_value"])),
    )
    return frame.iloc[order].reset_index(drop=True)


def _slice_order(name: str, value: Any) -> tuple:
    column = name.split("=", 1)[0]
    return (column, *_sortable(value))


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def model_metrics(store: MetadataStore | str, model_id: int, slice_column: str | None = None) -> pd.DataFrame:
    """The model's TFMA metrics per slice (of `slice_column` if given) as a DataFrame."""
    store = open_store(store)
    get_artifact(store, model_id, MODEL.name)
    evaluation = model_evaluation(store, model_id)
    if evaluation is None:
        raise MetadataError(f"model {model_id} was never evaluated: no Evaluator read it as its candidate model")
    return metrics_frame(load_eval_result(evaluation.uri), slice_column)


# -- TensorBoard -------------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorBoardServer:
    """A TensorBoard serving in this process on loopback; `stop()` ends its serving loop and closes its socket."""

    url: str
    logdirs: dict[str, str]
    _server: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_tensorboard(store: MetadataStore | str, model_ids: list[int], port: int | None = None) -> TensorBoardServer:
    """Serve the models' training logs: one model as --logdir, several side by side via --logdir_spec."""
    import tensorflow as tf
    from tensorboard import program

    store = open_store(store)
    logdirs = {f"model_{mid}": model_run(store, mid).uri for mid in model_ids}
    for name, directory in logdirs.items():
        if not tf.io.gfile.isdir(directory):  # an object-store prefix counts as a directory here
            raise MetadataError(f"{name}: its TensorBoard log directory {directory} no longer exists")
    # Port 0: the OS picks a free one while binding, so no other process can take it in between.
    argv = [None, "--host", "127.0.0.1", "--port", str(port or 0), "--load_fast", "false"]
    if len(logdirs) == 1:
        argv += ["--logdir", next(iter(logdirs.values()))]
    else:
        argv += ["--logdir_spec", ",".join(f"{name}:{d}" for name, d in logdirs.items())]
    servers: list[Any] = []

    def server_class(wsgi_app: Any, flags: Any) -> Any:
        # launch() returns only the URL: keep the server it builds, the handle stop() needs.
        servers.append(program.WerkzeugServer(wsgi_app, flags))
        return servers[-1]

    board = program.TensorBoard(server_class=server_class)
    board.configure(argv=argv)
    url = board.launch()
    return TensorBoardServer(url, logdirs, servers[0])


# -- diff of two models ------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelDiff:
    """What differs between the lineages of two models, section by section (empty = no difference)."""

    lhs: int
    rhs: int
    data: pd.DataFrame
    schema: pd.DataFrame
    statistics: pd.DataFrame
    code: dict[str, str]
    config: pd.DataFrame
    metrics: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(frame.to_json(orient="records"))

        return {
            "lhs": self.lhs,
            "rhs": self.rhs,
            "data": records(self.data),
            "schema": records(self.schema),
            "statistics": records(self.statistics),
            "code": self.code,
            "config": records(self.config),
            "metrics": records(self.metrics),
        }


def _by_component(executions_found: list[mlmd_pb2.Execution]) -> dict[str, mlmd_pb2.Execution]:
    out: dict[str, mlmd_pb2.Execution] = {}
    for e in executions_found:
        out.setdefault(prop_value(e, "component_id") or e.type, e)
    return out


def _data_diff(lhs: list[Artifact], rhs: list[Artifact]) -> pd.DataFrame:
    def keyed(artifacts: list[Artifact]) -> dict[str, Artifact]:
        nearest: dict[str, Artifact] = {}
        for a in artifacts:
            if a.type.name == EXAMPLES.name:
                nearest.setdefault(str(a.properties.get("producer_component", "?")), a)
        return nearest

    left, right = keyed(lhs), keyed(rhs)
    rows = []
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key), right.get(key)
        fa = a.properties.get("fingerprint") if a else None
        fb = b.properties.get("fingerprint") if b else None
        rows.append(
            {
                "examples": key,
                "lhs_id": a.id if a else None,
                "rhs_id": b.id if b else None,
                "lhs_fingerprint": fa,
                "rhs_fingerprint": fb,
                "lhs_rows": json.dumps(a.properties.get("row_counts"), sort_keys=True) if a else None,
                "rhs_rows": json.dumps(b.properties.get("row_counts"), sort_keys=True) if b else None,
                "same": a is not None and b is not None and (a.id == b.id or (fa is not None and fa == fb)),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["examples", "lhs_id", "rhs_id", "lhs_fingerprint", "rhs_fingerprint", "lhs_rows", "rhs_rows", "same"],
    )


def _schema_diff(lhs: Artifact | None, rhs: Artifact | None) -> pd.DataFrame:
    from tensorflow_metadata.proto.v0 import schema_pb2

    columns = ["feature", "change", "lhs", "rhs"]
    if lhs is None or rhs is None or lhs.id == rhs.id:
        return pd.DataFrame([], columns=columns)
    left = {f.name: f for f in read_schema(lhs).feature}
    right = {f.name: f for f in read_schema(rhs).feature}
    rows = []
    for name in sorted(set(left) | set(right)):
        a, b = left.get(name), right.get(name)
        if a is None:
            rows.append({"feature": name, "change": "added", "lhs": None, "rhs": schema_pb2.FeatureType.Name(b.type)})
        elif b is None:
            rows.append({"feature": name, "change": "removed", "lhs": schema_pb2.FeatureType.Name(a.type), "rhs": None})
        elif a.type != b.type:
            rows.append(
                {
                    "feature": name,
                    "change": "type changed",
                    "lhs": schema_pb2.FeatureType.Name(a.type),
                    "rhs": schema_pb2.FeatureType.Name(b.type),
                }
            )
        elif a.presence.min_fraction != b.presence.min_fraction or a.domain != b.domain:
            rows.append(
                {"feature": name, "change": "constraints changed", "lhs": str(a).strip(), "rhs": str(b).strip()}
            )
    return pd.DataFrame(rows, columns=columns)


def _categorical_distribution(feature: Any) -> dict[str, float]:
    s = feature.string_stats
    buckets = [(b.label, b.sample_count) for b in s.rank_histogram.buckets] or [
        (v.value, v.frequency) for v in s.top_values
    ]
    total = sum(count for _, count in buckets)
    return {label: count / total for label, count in buckets} if total else {}


def linf_distance(lhs_feature: Any, rhs_feature: Any) -> float | None:
    """TFDV's drift measure for categorical features: the largest change in any value's share."""
    a, b = _categorical_distribution(lhs_feature), _categorical_distribution(rhs_feature)
    if not a or not b:
        return None
    return max(abs(a.get(v, 0.0) - b.get(v, 0.0)) for v in set(a) | set(b))


STATISTICS_DIFF_COLUMNS = (
    "feature",
    "kind",
    "lhs_mean",
    "rhs_mean",
    "mean_change_pct",
    "lhs_std",
    "rhs_std",
    "lhs_unique",
    "rhs_unique",
    "linf",
)


def statistics_diff(lhs_stats: Any, rhs_stats: Any) -> pd.DataFrame:
    """Per feature: mean/std change for numbers, unique-count change and L-inf distance for categories."""

    def features(stats: Any) -> dict[str, Any]:
        return {feature_name(f): f for d in stats.datasets for f in d.features}

    left, right = features(lhs_stats), features(rhs_stats)
    rows = []
    for name in sorted(set(left) & set(right)):
        a, b = left[name], right[name]
        if a.HasField("num_stats") and b.HasField("num_stats"):
            change = b.num_stats.mean - a.num_stats.mean
            scale = abs(a.num_stats.mean) or 1.0
            rows.append(
                {
                    "feature": name,
                    "kind": "numeric",
                    "lhs_mean": a.num_stats.mean,
                    "rhs_mean": b.num_stats.mean,
                    "mean_change_pct": 100.0 * change / scale,
                    "lhs_std": a.num_stats.std_dev,
                    "rhs_std": b.num_stats.std_dev,
                    "lhs_unique": None,
                    "rhs_unique": None,
                    "linf": None,
                }
            )
        elif a.HasField("string_stats") and b.HasField("string_stats"):
            rows.append(
                {
                    "feature": name,
                    "kind": "categorical",
                    "lhs_mean": None,
                    "rhs_mean": None,
                    "mean_change_pct": None,
                    "lhs_std": None,
                    "rhs_std": None,
                    "lhs_unique": a.string_stats.unique,
                    "rhs_unique": b.string_stats.unique,
                    "linf": linf_distance(a, b),
                }
            )
    return pd.DataFrame(rows, columns=list(STATISTICS_DIFF_COLUMNS))


def module_source(store: MetadataStore, execution: mlmd_pb2.Execution, key: str) -> tuple[str | None, str]:
    """(text, where it came from) of a user module: the copy staged at launch, which is what the
    execution ran; for runs recorded before staging, a copy in its outputs, else the path now."""
    from apache_beam.io.filesystems import FileSystems

    path = execution_config(execution).get(key)
    if not path:
        return None, "not configured"
    staged = json.loads(prop_value(execution, "staged_modules") or "{}").get(key)
    if staged:
        if not FileSystems.exists(staged):
            return None, f"the copy staged at launch, {staged}, no longer exists"
        return artifact_io.read_bytes(staged).decode(errors="replace"), f"{path} as staged at launch: {staged}"
    name = os.path.basename(path)
    for artifact in _outputs_of(store, execution.id).values():
        patterns = [artifact_io.join(artifact.uri, name), artifact_io.join(artifact.uri, "**", name)]
        matches = sorted({m.path for found in FileSystems.match(patterns) for m in found.metadata_list})
        if matches:
            copy = matches[0]
            return artifact_io.read_bytes(copy).decode(
                errors="replace"
            ), f"copy stored in artifact {artifact.id}: {copy}"
    if FileSystems.exists(path):
        return artifact_io.read_bytes(path).decode(
            errors="replace"
        ), f"{path} (as it is now; no copy was stored with the run)"
    return None, f"{path} no longer exists and no copy was stored with the run"


def _code_diff(
    store: MetadataStore, left: dict[str, mlmd_pb2.Execution], right: dict[str, mlmd_pb2.Execution]
) -> dict[str, str]:
    diffs = {}
    for component in sorted(set(left) & set(right)):
        keys = {
            k for e in (left[component], right[component]) for k in execution_config(e) if k.endswith("module_file")
        }
        for key in sorted(keys):
            a_text, a_from = module_source(store, left[component], key)
            b_text, b_from = module_source(store, right[component], key)
            if a_text == b_text:
                continue
            lines = difflib.unified_diff(
                (a_text or "").splitlines(keepends=True),
                (b_text or "").splitlines(keepends=True),
                fromfile=f"lhs {component}.{key}: {a_from}",
                tofile=f"rhs {component}.{key}: {b_from}",
            )
            diffs[f"{component}.{key}"] = "".join(lines)
    return diffs


def _config_diff(left: dict[str, mlmd_pb2.Execution], right: dict[str, mlmd_pb2.Execution]) -> pd.DataFrame:
    rows = []
    for component in sorted(set(left) | set(right)):
        a = flatten(execution_config(left[component])) if component in left else {}
        b = flatten(execution_config(right[component])) if component in right else {}
        if component not in left or component not in right:
            rows.append(
                {
                    "component": component,
                    "key": "(component)",
                    "lhs": "present" if component in left else "absent",
                    "rhs": "present" if component in right else "absent",
                }
            )
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                rows.append(
                    {"component": component, "key": key, "lhs": json.dumps(a.get(key)), "rhs": json.dumps(b.get(key))}
                )
    return pd.DataFrame(rows, columns=["component", "key", "lhs", "rhs"])


def _metrics_diff(store: MetadataStore, lhs: int, rhs: int) -> pd.DataFrame:
    def overall(model_id: int) -> dict[str, float]:
        evaluation = model_evaluation(store, model_id)
        if evaluation is None:
            return {}
        frame = metrics_frame(load_eval_result(evaluation.uri))
        top = frame[frame["slice"] == OVERALL]
        return {} if top.empty else {k: v for k, v in top.iloc[0].items() if k not in ("slice", "slice_value")}

    a, b = overall(lhs), overall(rhs)
    rows = [
        {
            "metric": name,
            "lhs": a.get(name),
            "rhs": b.get(name),
            "change": (b[name] - a[name]) if name in a and name in b else None,
        }
        for name in sorted(set(a) | set(b))
    ]
    return pd.DataFrame(rows, columns=["metric", "lhs", "rhs", "change"])


def diff(store: MetadataStore | str, lhs: int, rhs: int) -> ModelDiff:
    """Compare two models' lineages: data, schema, statistics drift, user code, configuration and metrics."""
    store = open_store(store)
    for model_id in (lhs, rhs):
        get_artifact(store, model_id, MODEL.name)
    left_execs, left_artifacts = upstream(store, lhs)
    right_execs, right_artifacts = upstream(store, rhs)
    left, right = _by_component(left_execs), _by_component(right_execs)

    def first(artifacts: list[Artifact], type_name: str) -> Artifact | None:
        return next((a for a in artifacts if a.type.name == type_name), None)

    stats_rows = []
    try:
        left_data, right_data = training_data(store, lhs), training_data(store, rhs)
    except MetadataError:
        left_data = right_data = None
    if left_data and right_data and left_data.statistics.id != right_data.statistics.id:
        for split in [s for s in left_data.stats if s in right_data.stats]:
            frame = statistics_diff(left_data.stats[split], right_data.stats[split])
            frame.insert(0, "split", split)
            stats_rows.append(frame)
    if stats_rows:
        statistics = pd.concat(stats_rows, ignore_index=True)
    else:
        statistics = pd.DataFrame([], columns=["split", *STATISTICS_DIFF_COLUMNS])
    return ModelDiff(
        lhs=lhs,
        rhs=rhs,
        data=_data_diff(left_artifacts, right_artifacts),
        schema=_schema_diff(first(left_artifacts, SCHEMA.name), first(right_artifacts, SCHEMA.name)),
        statistics=statistics,
        code=_code_diff(store, left, right),
        config=_config_diff(left, right),
        metrics=_metrics_diff(store, lhs, rhs),
    )
