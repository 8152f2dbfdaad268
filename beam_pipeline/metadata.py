"""ML Metadata: the store every run records its executions, artifacts, contexts and lineage in.

Only the driver talks to the store, so recording works the same whether the graph runs in this
process or on remote workers: workers leave commit markers next to the artifacts, the driver reads
them and publishes.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from ml_metadata import errors as mlmd_errors
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline.artifacts import ALL_TYPES, Artifact, ArtifactType
from beam_pipeline.errors import MetadataError

PIPELINE_CONTEXT = "pipeline"
RUN_CONTEXT = "pipeline_run"
EXECUTION_PROPERTIES = ("component_id", "pipeline_name", "run_id", "config", "cache_key")

STATE_NAMES = {
    mlmd_pb2.Execution.UNKNOWN: "UNKNOWN",
    mlmd_pb2.Execution.NEW: "NEW",
    mlmd_pb2.Execution.RUNNING: "RUNNING",
    mlmd_pb2.Execution.COMPLETE: "COMPLETE",
    mlmd_pb2.Execution.FAILED: "FAILED",
    mlmd_pb2.Execution.CACHED: "CACHED",
    mlmd_pb2.Execution.CANCELED: "CANCELED",
}


def connection_config(uri: str) -> mlmd_pb2.ConnectionConfig:
    """Build a connection from `sqlite:///abs/path`, a plain file path, or `mysql://user:pw@host:port/db`."""
    config = mlmd_pb2.ConnectionConfig()
    if uri.startswith("mysql://"):
        parsed = urllib.parse.urlparse(uri)
        if not parsed.hostname or not parsed.path.strip("/"):
            raise MetadataError(f"MySQL metadata URI {uri!r} needs a host and a database: mysql://user:pw@host:3306/db")
        config.mysql.host = parsed.hostname
        config.mysql.port = parsed.port or 3306
        config.mysql.database = parsed.path.strip("/")
        config.mysql.user = urllib.parse.unquote(parsed.username or "root")
        if parsed.password:
            config.mysql.password = urllib.parse.unquote(parsed.password)
        query = urllib.parse.parse_qs(parsed.query)
        if "socket" in query:
            config.mysql.socket = query["socket"][0]
        return config
    path = uri[len("sqlite://") :] if uri.startswith("sqlite://") else uri
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = mlmd_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return config


def _put_type(put, type_proto) -> int:
    """Register a type; a concurrent registration by another run is fine, so try once more."""
    try:
        return put(type_proto, can_add_fields=True)
    except mlmd_errors.AlreadyExistsError:
        return put(type_proto, can_add_fields=True)


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


class MetadataStore:
    """A thin, typed layer over `ml_metadata.MetadataStore` with this project's types and contexts."""

    def __init__(self, config: mlmd_pb2.ConnectionConfig | str):
        if isinstance(config, str):
            self.uri = config
            config = connection_config(config)
        else:
            self.uri = (
                config.sqlite.filename_uri or f"mysql://{config.mysql.host}:{config.mysql.port}/{config.mysql.database}"
            )
        self._store = self._open(config)
        self._type_ids: dict[str, int] = {}
        self._lock = threading.RLock()

    def _open(self, config: mlmd_pb2.ConnectionConfig) -> metadata_store.MetadataStore:
        # Two processes opening an empty MySQL database race to create its tables; MLMD (or MySQL,
        # with a deadlock) asks to retry.
        for attempt in range(6):
            try:
                return metadata_store.MetadataStore(config)
            except Exception as e:  # MLMD raises its own error types per backend
                if not any(m in str(e) for m in ("concurrent connection", "Deadlock found")) or attempt == 5:
                    raise MetadataError(f"cannot open ML Metadata store {self.uri}: {e}") from e
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    @property
    def mlmd(self) -> metadata_store.MetadataStore:
        """The underlying ml_metadata store, for queries this layer does not wrap."""
        return self._store

    # -- types ---------------------------------------------------------------------------------------
    def _artifact_type_id(self, atype: ArtifactType) -> int:
        key = "A:" + atype.name
        if key not in self._type_ids:
            t = mlmd_pb2.ArtifactType(name=atype.name)
            for p in atype.properties:
                t.properties[p] = mlmd_pb2.STRING
            self._type_ids[key] = _put_type(self._store.put_artifact_type, t)
        return self._type_ids[key]

    def _execution_type_id(self, name: str) -> int:
        key = "E:" + name
        if key not in self._type_ids:
            t = mlmd_pb2.ExecutionType(name=name)
            for p in EXECUTION_PROPERTIES:
                t.properties[p] = mlmd_pb2.STRING
            self._type_ids[key] = _put_type(self._store.put_execution_type, t)
        return self._type_ids[key]

    def _context_type_id(self, name: str) -> int:
        key = "C:" + name
        if key not in self._type_ids:
            self._type_ids[key] = _put_type(self._store.put_context_type, mlmd_pb2.ContextType(name=name))
        return self._type_ids[key]

    # -- contexts ------------------------------------------------------------------------------------
    def run_contexts(self, pipeline_name: str, run_id: str) -> list[mlmd_pb2.Context]:
        """The pipeline context (shared by all runs) and this run's context, created if absent."""
        with self._lock:
            contexts = []
            for type_name, name in ((PIPELINE_CONTEXT, pipeline_name), (RUN_CONTEXT, f"{pipeline_name}.{run_id}")):
                existing = self._store.get_context_by_type_and_name(type_name, name)
                if existing is None:
                    ctx = mlmd_pb2.Context(type_id=self._context_type_id(type_name), name=name)
                    try:
                        ctx.id = self._store.put_contexts([ctx])[0]
                        existing = ctx
                    except mlmd_errors.AlreadyExistsError:  # another run created it meanwhile
                        existing = self._store.get_context_by_type_and_name(type_name, name)
                contexts.append(existing)
            return contexts

    # -- executions ----------------------------------------------------------------------------------
    def start_execution(
        self,
        component_type: str,
        component_id: str,
        *,
        pipeline_name: str,
        run_id: str,
        config: Mapping[str, Any],
        cache_key: str,
        contexts: list[mlmd_pb2.Context],
    ) -> int:
        """Register an execution as RUNNING before the graph runs, so its id can name output dirs."""
        with self._lock:
            e = mlmd_pb2.Execution(type_id=self._execution_type_id(component_type))
            e.last_known_state = mlmd_pb2.Execution.RUNNING
            values = {
                "component_id": component_id,
                "pipeline_name": pipeline_name,
                "run_id": run_id,
                "config": json.dumps(config, sort_keys=True),
                "cache_key": cache_key,
            }
            for k, v in values.items():
                e.properties[k].string_value = v
            e.custom_properties["start_time_ms"].double_value = time.time() * 1000
            execution_id, _, _ = self._store.put_execution(e, [], contexts)
            return execution_id

    def finish_execution(
        self,
        execution_id: int,
        *,
        state: int,
        inputs: Mapping[str, Iterable[Artifact]],
        outputs: Mapping[str, Artifact],
        contexts: list[mlmd_pb2.Context],
        end_time_ms: int | None = None,
        start_time_ms: int | None = None,
        error: str | None = None,
        cache_key: str | None = None,
    ) -> None:
        """Publish outputs (assigning their ids), link inputs, and set the final state in one call."""
        with self._lock:
            [e] = self._store.get_executions_by_id([execution_id])
            e.last_known_state = state
            if cache_key is not None:
                e.properties["cache_key"].string_value = cache_key
            # Times are doubles: MLMD's MySQL schema stores int_value in a 32-bit column.
            e.custom_properties["end_time_ms"].double_value = float(end_time_ms or time.time() * 1000)
            if start_time_ms is not None:
                e.custom_properties["start_time_ms"].double_value = float(start_time_ms)
            if error:
                e.custom_properties["error"].string_value = error[:4000]
            pairs: list[tuple[mlmd_pb2.Artifact, mlmd_pb2.Event]] = []
            order: list[Artifact] = []
            for kind, mapping in (
                (mlmd_pb2.Event.INPUT, inputs),
                (mlmd_pb2.Event.OUTPUT, {k: [v] for k, v in outputs.items()}),
            ):
                for name, artifacts in mapping.items():
                    for index, a in enumerate(artifacts):
                        event = mlmd_pb2.Event(type=kind)
                        event.path.steps.add().key = name
                        event.path.steps.add().index = index
                        pairs.append((self._to_proto(a), event))
                        order.append(a)
            _, artifact_ids, _ = self._store.put_execution(e, pairs, contexts, reuse_context_if_already_exist=True)
            for a, aid in zip(order, artifact_ids, strict=False):
                a.id = aid

    def set_execution_property(self, execution_id: int, name: str, value: float) -> None:
        """Add a measurement known only after publication (e.g. the runner's processing time)."""
        with self._lock:
            [e] = self._store.get_executions_by_id([execution_id])
            e.custom_properties[name].double_value = float(value)
            self._store.put_executions([e])

    def _to_proto(self, a: Artifact) -> mlmd_pb2.Artifact:
        proto = mlmd_pb2.Artifact(type_id=self._artifact_type_id(a.type), uri=a.uri)
        if a.id is not None:  # an existing artifact linked as input: do not rewrite it
            [existing] = self._store.get_artifacts_by_id([a.id])
            return existing
        proto.state = mlmd_pb2.Artifact.LIVE
        for k, v in a.properties.items():
            if v is None:
                continue
            target = proto.properties if k in a.type.properties else proto.custom_properties
            target[k].string_value = _encode(v)
        return proto

    # -- reading -------------------------------------------------------------------------------------
    def _from_proto(self, proto: mlmd_pb2.Artifact, type_name: str | None = None) -> Artifact:
        if type_name is None:
            [t] = self._store.get_artifact_types_by_id([proto.type_id])
            type_name = t.name
        atype = ALL_TYPES.get(type_name) or ArtifactType(type_name)
        props = {k: _decode(v.string_value) for k, v in proto.properties.items()}
        props.update({k: _decode(v.string_value) for k, v in proto.custom_properties.items()})
        return Artifact(atype, proto.uri, props, proto.id)

    def get_artifacts(self, ids: Iterable[int]) -> list[Artifact]:
        return [self._from_proto(p) for p in self._store.get_artifacts_by_id(list(ids))]

    def latest_artifacts(
        self, type_name: str, pipeline_name: str, properties: Mapping[str, Any] | None = None
    ) -> list[Artifact]:
        """Published artifacts of one type in one pipeline, newest first, optionally matching properties."""
        ctx = self._store.get_context_by_type_and_name(PIPELINE_CONTEXT, pipeline_name)
        if ctx is None:
            return []
        try:
            protos = self._store.get_artifacts_by_type(type_name)
        except Exception:  # the type was never registered in this store
            return []
        in_pipeline = {a.id for a in self._store.get_artifacts_by_context(ctx.id)}
        found = []
        for p in protos:
            if p.id not in in_pipeline or p.state != mlmd_pb2.Artifact.LIVE:
                continue
            a = self._from_proto(p, type_name)
            if properties and any(a.properties.get(k) != v for k, v in properties.items()):
                continue
            found.append(a)
        return sorted(found, key=lambda a: a.id or 0, reverse=True)

    def cached_outputs(self, cache_key: str, component_type: str) -> tuple[int, dict[str, Artifact]] | None:
        """The newest COMPLETE execution with this cache key whose outputs all still exist on disk."""
        try:
            executions = self._store.get_executions_by_type(component_type)
        except Exception:
            return None
        candidates = [
            e
            for e in executions
            if e.properties["cache_key"].string_value == cache_key and e.last_known_state == mlmd_pb2.Execution.COMPLETE
        ]
        for e in sorted(candidates, key=lambda e: e.id, reverse=True):
            outputs = self.execution_artifacts(e.id)[1]
            if outputs and all(_exists(a.uri) for a in outputs.values()):
                return e.id, outputs
        return None

    def execution_artifacts(self, execution_id: int) -> tuple[dict[str, list[Artifact]], dict[str, Artifact]]:
        """(inputs by name, outputs by name) of one execution, from its events."""
        events = self._store.get_events_by_execution_ids([execution_id])
        by_id = {a.id: a for a in self.get_artifacts({ev.artifact_id for ev in events})}
        inputs: dict[str, list[Artifact]] = {}
        outputs: dict[str, Artifact] = {}
        for ev in events:
            name = ev.path.steps[0].key if ev.path.steps else ""
            if ev.type == mlmd_pb2.Event.OUTPUT:
                outputs[name] = by_id[ev.artifact_id]
            elif ev.type == mlmd_pb2.Event.INPUT:
                inputs.setdefault(name, []).append(by_id[ev.artifact_id])
        return inputs, outputs


def _exists(uri: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(uri)
