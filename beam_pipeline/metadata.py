"""ML Metadata: the store every run records its executions, artifacts, contexts and lineage in.

Only the driver talks to the store, so recording works the same whether the graph runs in this
process or on remote workers: workers leave commit markers next to the artifacts, the driver reads
them and publishes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ml_metadata import errors as mlmd_errors
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import artifact_io, remote_fs
from beam_pipeline.artifacts import ALL_TYPES, Artifact, ArtifactType
from beam_pipeline.errors import MetadataError

PIPELINE_CONTEXT = "pipeline"
RUN_CONTEXT = "pipeline_run"
EXECUTION_PROPERTIES = ("component_id", "pipeline_name", "run_id", "config", "cache_key")

# An execution left RUNNING by a launcher that is gone (killed, machine lost) is shown and recorded
# as abandoned; MLMD has no such state, so it is FAILED with this prefix in its error.
ABANDONED = "ABANDONED"
ABANDONED_PREFIX = "abandoned: "
# A launcher on another host is presumed dead when its run's heartbeat is older than this.
HEARTBEAT_INTERVAL_S = 30.0
STALE_HEARTBEAT_S = 600.0

# Errors worth a bounded retry: the server is briefly unreachable, or a transaction was rolled back.
_TRANSIENT_ERRORS = (mlmd_errors.UnavailableError, mlmd_errors.AbortedError, mlmd_errors.DeadlineExceededError)
_TRANSIENT_TEXT = ("Deadlock found", "concurrent connection", "Lost connection", "server has gone away")
_ATTEMPTS = 5
_T = TypeVar("_T")

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
        config.mysql.database = parsed.path.strip("/")
        config.mysql.user = urllib.parse.unquote(parsed.username or "root")
        if parsed.password:
            config.mysql.password = urllib.parse.unquote(parsed.password)
        query = urllib.parse.parse_qs(parsed.query)
        if "socket" in query:  # MLMD takes a socket or a host, never both (it aborts the process otherwise)
            config.mysql.socket = query["socket"][0]
        else:
            config.mysql.host = parsed.hostname
            config.mysql.port = parsed.port or 3306
        return config
    path = uri[len("sqlite://") :] if uri.startswith("sqlite://") else uri
    if "://" in path:  # made local, s3://b/m.sqlite would become a directory named `s3:` here
        raise MetadataError(
            f"ML Metadata URI {uri!r}: a SQLite store must be a local file path; for a shared store use "
            "mysql://user:pw@host:3306/db"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = mlmd_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return config


def is_transient(error: BaseException) -> bool:
    """True for store errors that a retry can cure (a dropped connection, a deadlock)."""
    if isinstance(error, _TRANSIENT_ERRORS):
        return True
    return isinstance(error, mlmd_errors.StatusError) and any(t in str(error) for t in _TRANSIENT_TEXT)


def _retrying(what: str, uri: str, call: Callable[[], _T], *, attempts: int = _ATTEMPTS) -> _T:
    """Run a store call, retrying transient errors a bounded number of times, else a MetadataError.

    Never turns an error into an empty answer: a caller that gets no exception got the store's word.
    """
    for attempt in range(attempts):
        try:
            return call()
        except mlmd_errors.StatusError as e:
            if not is_transient(e) or attempt == attempts - 1:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise MetadataError(f"ML Metadata store {uri}: {what} failed{tries}: {e}") from e
            time.sleep(min(0.2 * 2**attempt, 3.0))
    raise AssertionError("unreachable")


def launcher_identity() -> dict[str, Any]:
    """Who is running the launcher: host, pid and the pid's start time (pids are reused)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid())}


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot, or "" where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def launcher_alive(identity: Mapping[str, Any]) -> bool | None:
    """Whether the launcher process is still running: None when it ran on another host (unknowable here)."""
    if identity.get("host") != socket.gethostname():
        return None
    pid = int(identity.get("pid") or 0)
    if pid <= 0:
        return None
    if identity.get("pid_start"):
        return _process_start(pid) == identity["pid_start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def _read(self, what: str, call: Callable[[], _T]) -> _T:
        """A read: retried on transient errors, any other store error a MetadataError."""
        return _retrying(what, self.uri, call)

    def _write(self, what: str, call: Callable[[], _T]) -> _T:
        """A write: retried only when the server rolled it back (deadlock, abort), else a MetadataError."""

        def once() -> _T:
            try:
                return call()
            except (mlmd_errors.UnavailableError, mlmd_errors.DeadlineExceededError) as e:
                # The write may have landed before the connection dropped: retrying could apply it twice.
                raise MetadataError(f"ML Metadata store {self.uri}: {what} failed: {e}") from e

        return _retrying(what, self.uri, once)

    def _open(self, config: mlmd_pb2.ConnectionConfig) -> metadata_store.MetadataStore:
        # Two processes opening an empty MySQL database race to create its tables; MLMD (or MySQL,
        # with a deadlock) asks to retry.
        def connect() -> metadata_store.MetadataStore:
            try:
                return metadata_store.MetadataStore(config)
            except RuntimeError as e:  # how MLMD's constructor reports every backend's errors
                transient = any(t in str(e) for t in _TRANSIENT_TEXT)
                raise (mlmd_errors.AbortedError if transient else mlmd_errors.InternalError)(str(e)) from e

        try:
            return _retrying("opening", self.uri, connect, attempts=6)
        except MetadataError as e:
            raise MetadataError(f"cannot open ML Metadata store {self.uri}: {e.__cause__}") from e.__cause__

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
        """The pipeline context (shared by all runs) and this run's context, created if absent.

        The run context records who launched it and a heartbeat, so a later run can tell a run whose
        launcher died (its executions are then marked abandoned) from one still going.
        """
        with self._lock:
            contexts = []
            for type_name, name in ((PIPELINE_CONTEXT, pipeline_name), (RUN_CONTEXT, f"{pipeline_name}.{run_id}")):
                existing = self._read(
                    "reading contexts", lambda t=type_name, n=name: self._store.get_context_by_type_and_name(t, n)
                )
                if existing is None:
                    ctx = mlmd_pb2.Context(type_id=self._context_type_id(type_name), name=name)
                    if type_name == RUN_CONTEXT:
                        ctx.custom_properties["launcher"].string_value = json.dumps(launcher_identity())
                        ctx.custom_properties["heartbeat_ms"].double_value = time.time() * 1000
                    try:
                        ctx.id = self._store.put_contexts([ctx])[0]
                        existing = ctx
                    except mlmd_errors.AlreadyExistsError:  # another run created it meanwhile
                        existing = self._store.get_context_by_type_and_name(type_name, name)
                contexts.append(existing)
            return contexts

    def heartbeat(self, run_context: mlmd_pb2.Context) -> None:
        """Tell later runs that this run's launcher is alive."""
        with self._lock:
            [ctx] = self._read("reading the run context", lambda: self._store.get_contexts_by_id([run_context.id]))
            ctx.custom_properties["heartbeat_ms"].double_value = time.time() * 1000
            self._write("recording a heartbeat", lambda: self._store.put_contexts([ctx]))

    def sweep_abandoned(self, pipeline_name: str, *, stale_after_s: float = STALE_HEARTBEAT_S) -> list[dict[str, Any]]:
        """Mark RUNNING executions of this pipeline whose launcher is gone as abandoned (FAILED).

        Returns one dict per swept execution (id, component_id, output_uris) so the caller can remove
        what it had half-written. A launcher on this host is checked by pid; on another host by its
        run's heartbeat, older than `stale_after_s`.
        """
        with self._lock:
            ctx = self._read(
                "reading contexts", lambda: self._store.get_context_by_type_and_name(PIPELINE_CONTEXT, pipeline_name)
            )
            if ctx is None:
                return []
            executions = self._read("reading executions", lambda: self._store.get_executions_by_context(ctx.id))
            running = [e for e in executions if e.last_known_state == mlmd_pb2.Execution.RUNNING]
            swept = []
            for e in running:
                why = self._why_abandoned(pipeline_name, e, stale_after_s)
                if why is None:
                    continue
                e.last_known_state = mlmd_pb2.Execution.FAILED
                e.custom_properties["error"].string_value = ABANDONED_PREFIX + why
                e.custom_properties["end_time_ms"].double_value = time.time() * 1000
                self._write("marking an abandoned execution", lambda e=e: self._store.put_executions([e]))
                raw = e.custom_properties["output_uris"].string_value if "output_uris" in e.custom_properties else ""
                swept.append(
                    {
                        "id": e.id,
                        "component_id": e.properties["component_id"].string_value,
                        "output_uris": json.loads(raw) if raw else {},
                    }
                )
            return swept

    def _why_abandoned(self, pipeline_name: str, e: mlmd_pb2.Execution, stale_after_s: float) -> str | None:
        run_id = e.properties["run_id"].string_value
        run_ctx = self._read(
            "reading contexts",
            lambda: self._store.get_context_by_type_and_name(RUN_CONTEXT, f"{pipeline_name}.{run_id}"),
        )
        if run_ctx is None or "launcher" not in run_ctx.custom_properties:
            return f"run {run_id} records no launcher, and the execution never finished"
        identity = json.loads(run_ctx.custom_properties["launcher"].string_value)
        alive = launcher_alive(identity)
        if alive is True:
            return None
        if alive is False:
            return f"the launcher of run {run_id} (pid {identity['pid']} on {identity['host']}) is gone"
        beat_ms = run_ctx.custom_properties["heartbeat_ms"].double_value
        age_s = time.time() - beat_ms / 1000
        if age_s < stale_after_s:
            return None
        return f"the launcher of run {run_id} on {identity.get('host')} sent no heartbeat for {age_s:.0f} s"

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
            execution_id, _, _ = self._write(
                "registering an execution", lambda: self._store.put_execution(e, [], contexts)
            )
            return execution_id

    def annotate_execution(self, execution_id: int, **facts: Mapping[str, str]) -> None:
        """Record facts known once an execution is registered, as JSON custom properties: where it
        writes (so a run that finds it abandoned can remove its files), the module copies it loads."""
        with self._lock:
            [e] = self._read("reading an execution", lambda: self._store.get_executions_by_id([execution_id]))
            for name, value in facts.items():
                e.custom_properties[name].string_value = json.dumps(dict(value), sort_keys=True)
            self._write("annotating an execution", lambda: self._store.put_executions([e]))

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
            [e] = self._read("reading an execution", lambda: self._store.get_executions_by_id([execution_id]))
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
            _, artifact_ids, _ = self._write(
                "publishing an execution",
                lambda: self._store.put_execution(e, pairs, contexts, reuse_context_if_already_exist=True),
            )
            for a, aid in zip(order, artifact_ids, strict=False):
                a.id = aid

    def set_execution_property(self, execution_id: int, name: str, value: float) -> None:
        """Add a measurement known only after publication (e.g. the runner's processing time)."""
        with self._lock:
            [e] = self._read("reading an execution", lambda: self._store.get_executions_by_id([execution_id]))
            e.custom_properties[name].double_value = float(value)
            self._write("recording a measurement", lambda: self._store.put_executions([e]))

    def _to_proto(self, a: Artifact) -> mlmd_pb2.Artifact:
        proto = mlmd_pb2.Artifact(type_id=self._artifact_type_id(a.type), uri=a.uri)
        if a.id is not None:  # an existing artifact linked as input: do not rewrite it
            [existing] = self._read("reading an artifact", lambda: self._store.get_artifacts_by_id([a.id]))
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
            [t] = self._read("reading artifact types", lambda: self._store.get_artifact_types_by_id([proto.type_id]))
            type_name = t.name
        atype = ALL_TYPES.get(type_name) or ArtifactType(type_name)
        props = {k: _decode(v.string_value) for k, v in proto.properties.items()}
        props.update({k: _decode(v.string_value) for k, v in proto.custom_properties.items()})
        remote_fs.enable_for([proto.uri])  # whoever reads an artifact back opens its files next
        return Artifact(atype, proto.uri, props, proto.id)

    def get_artifacts(self, ids: Iterable[int]) -> list[Artifact]:
        ids = list(ids)
        return [
            self._from_proto(p) for p in self._read("reading artifacts", lambda: self._store.get_artifacts_by_id(ids))
        ]

    def latest_artifacts(
        self, type_name: str, pipeline_name: str, properties: Mapping[str, Any] | None = None
    ) -> list[Artifact]:
        """Published artifacts of one type in one pipeline, newest first, optionally matching properties."""
        ctx = self._read(
            "reading contexts", lambda: self._store.get_context_by_type_and_name(PIPELINE_CONTEXT, pipeline_name)
        )
        if ctx is None:
            return []
        protos = self._read(f"reading {type_name} artifacts", lambda: self._store.get_artifacts_by_type(type_name))
        in_pipeline = {
            a.id for a in self._read("reading artifacts", lambda: self._store.get_artifacts_by_context(ctx.id))
        }
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
        """The newest COMPLETE execution with this cache key whose outputs are all still whole."""
        executions = self._read(
            f"reading {component_type} executions", lambda: self._store.get_executions_by_type(component_type)
        )
        candidates = [
            e
            for e in executions
            if e.properties["cache_key"].string_value == cache_key and e.last_known_state == mlmd_pb2.Execution.COMPLETE
        ]
        for e in sorted(candidates, key=lambda e: e.id, reverse=True):
            outputs = self.execution_artifacts(e.id)[1]
            if outputs and all(artifact_io.is_intact(a.uri) for a in outputs.values()):
                return e.id, outputs
        return None

    def execution_artifacts(self, execution_id: int) -> tuple[dict[str, list[Artifact]], dict[str, Artifact]]:
        """(inputs by name, outputs by name) of one execution, from its events."""
        events = self._read("reading events", lambda: self._store.get_events_by_execution_ids([execution_id]))
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
