"""Loading, versioning and reference counting of the SavedModels under a model base path.

The layout is TF Serving's: `<model_base_path>/<integer version>/saved_model.pb`. A poll of the base path
loads versions that appeared and retires versions that are no longer wanted; a retired version stays in
memory until the last request that acquired it has released it, so a push never breaks a request that
is already running. A version that fails to load is reported in the status with its error and retried
only when its directory changes or its (exponential, bounded) backoff has expired.

A base path on an object store (`s3://`, `gs://`) is read through `tf.io.gfile`: "directories" are
prefixes there, and a version whose `saved_model.pb` is not there yet (the Pusher copies it last) fails to
load as NOT_FOUND, is never served, and is tried again as soon as its objects change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import gc
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from beam_pipeline import remote_fs
from beam_pipeline.serving.errors import BadRequestError, ModelLoadError, ServableNotFoundError
from beam_pipeline.serving.names import MODEL_NAME_RE, VERSION_RE

log = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.pb"


class VersionState(enum.Enum):
    """The lifecycle states TF Serving reports in `model_version_status`."""

    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Dtype and shape of one signature input or output; `shape` is None when the rank is unknown.

    `kind` ("string", "bool", "float", "int" or "other") and the integer bounds are derived once here
    because comparing tf.DTypes on every request is surprisingly slow.
    """

    dtype: tf.DType
    shape: tuple[int | None, ...] | None
    kind: str = dataclasses.field(init=False)
    numpy_dtype: np.dtype = dataclasses.field(init=False)
    bounds: tuple[int, int] | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        dtype = self.dtype
        if dtype == tf.string:
            kind = "string"
        elif dtype.is_bool:
            kind = "bool"
        elif dtype.is_floating:
            kind = "float"
        elif dtype.is_integer:
            kind = "int"
        else:
            kind = "other"
        object.__setattr__(self, "kind", kind)
        numeric = kind in ("bool", "float", "int")
        object.__setattr__(self, "numpy_dtype", np.dtype(dtype.as_numpy_dtype if numeric else object))
        object.__setattr__(self, "bounds", (int(dtype.min), int(dtype.max)) if kind == "int" else None)

    @classmethod
    def from_spec(cls, spec: tf.TensorSpec) -> TensorInfo:
        shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
        return cls(spec.dtype, shape)

    @functools.cached_property
    def batched(self) -> bool:
        """True when dimension 0 is a free batch dimension, so requests can be concatenated along it."""
        return self.shape is not None and len(self.shape) >= 1 and self.shape[0] is None


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]

    @functools.cached_property
    def batched(self) -> bool:
        return bool(self.inputs) and all(t.batched for t in self.inputs.values())


class Servable:
    """One loaded version of the model. Acquire it through `ModelManager.acquire`, never keep it longer."""

    def __init__(
        self,
        name: str,
        version: int,
        path: str,
        model: Any,
        signatures: Mapping[str, Any],
        signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
    ):
        self.name = name
        self.version = version
        self.path = path
        self.state = VersionState.AVAILABLE
        self.refcount = 0
        self.model_calls = 0
        self._model = model
        self._functions = dict(signatures)
        self.signatures = {
            sig_name: SignatureInfo(
                sig_name,
                {k: TensorInfo.from_spec(s) for k, s in fn.structured_input_signature[1].items()},
                {k: TensorInfo.from_spec(s) for k, s in fn.structured_outputs.items()},
            )
            for sig_name, fn in self._functions.items()
        }
        # What GET .../metadata returns, computed once: TF Serving's JSON rendering of a SignatureDefMap.
        self.signature_def_json = {
            "signature_def": {
                k: json_format.MessageToDict(v, preserving_proto_field_name=True, including_default_value_fields=True)
                for k, v in signature_defs.items()
            }
        }
        self._calls_lock = threading.Lock()

    def signature(self, name: str) -> SignatureInfo:
        try:
            return self.signatures[name]
        except KeyError:
            raise BadRequestError(
                f'Serving signature name: "{name}" not found in signature def; signatures are {sorted(self.signatures)}'
            ) from None

    def run(self, signature: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call one signature on numpy inputs. Blocking: the server calls it from a worker thread."""
        fn = self._functions[signature]
        specs = self.signatures[signature].inputs
        with self._calls_lock:
            self.model_calls += 1
        try:
            outputs = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})
        except tf.errors.InvalidArgumentError as e:
            raise BadRequestError(f"signature {signature!r}: {tf_error_summary(e.message)}") from None
        return {k: v.numpy() for k, v in outputs.items()}

    def _release_model(self) -> None:
        self._model = None
        self._functions = {}
        self.state = VersionState.END


def tf_error_summary(message: str) -> str:
    """The lines of a TF runtime error that say what was wrong, without graph node traces."""
    noise = ("Graph execution error", "Detected at node", "<stack traces")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln[0].isspace()]
    text = " ".join(ln for ln in lines if not ln.startswith(noise)) or message.strip()
    return re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text)


def refreeze_gc() -> None:
    """Collect garbage (such as an unloaded version), then hide every surviving object from the collector.

    With TensorFlow and a model loaded the heap holds ~500k objects, and each full collection Python
    starts on its own stops the process for ~0.5 s: that was the p99 latency under load. Frozen objects
    are never scanned again, so only the poller pays for a full collection, once per version change.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _error_code(e: BaseException) -> str:
    """TF Serving's canonical error code name for a load failure (NotFoundError -> NOT_FOUND)."""
    if isinstance(e, tf.errors.OpError) and type(e) is not tf.errors.OpError:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__.removesuffix("Error")).upper()
    if isinstance(e, FileNotFoundError):
        return "NOT_FOUND"
    if isinstance(e, DecodeError):
        return "DATA_LOSS"
    if isinstance(e, (ValueError, LookupError, TypeError)):
        return "INVALID_ARGUMENT"
    return "UNKNOWN"


def _check_servable(path: str, servable: Servable) -> None:
    """Refuse a model no request could use: no signatures, or none whose inputs can be sent over REST."""
    if not servable.signatures:
        raise ModelLoadError(f"{path}: the SavedModel has no signatures to serve", "INVALID_ARGUMENT")
    unservable = {
        name: sorted(k for k, t in sig.inputs.items() if t.kind == "other") for name, sig in servable.signatures.items()
    }
    if all(unservable.values()):
        detail = "; ".join(f"{name}: inputs {inputs}" for name, inputs in sorted(unservable.items()))
        raise ModelLoadError(
            f"{path}: no signature can be served: their inputs have dtypes JSON cannot carry ({detail})",
            "INVALID_ARGUMENT",
        )


def _is_file(path: str) -> bool:
    if remote_fs.is_remote(path):
        return tf.io.gfile.exists(path)  # an object (no directories there to tell apart)
    return os.path.isfile(path)


def load_servable(name: str, version: int, path: str) -> Servable:
    """Load the SavedModel of one version directory; raise ModelLoadError when it is incomplete or broken."""
    pb_path = os.path.join(path, SAVED_MODEL_FILE)
    try:
        present = _is_file(pb_path)
    except tf.errors.OpError as e:
        raise ModelLoadError(f"{path}: {type(e).__name__}: {e}", _error_code(e)) from e
    if not present:
        raise ModelLoadError(f"{path}: no {SAVED_MODEL_FILE} in the version directory", "NOT_FOUND")
    try:
        with tf.io.gfile.GFile(pb_path, "rb") if remote_fs.is_remote(pb_path) else open(pb_path, "rb") as f:
            saved_model = saved_model_pb2.SavedModel.FromString(f.read())
        meta_graphs = [mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags]
        if not meta_graphs:
            raise ModelLoadError(f"{path}: no MetaGraph tagged 'serve'", "NOT_FOUND")
        model = tf.saved_model.load(path, tags=["serve"])
        servable = Servable(name, version, path, model, dict(model.signatures), meta_graphs[0].signature_def)
    except (OSError, ValueError, LookupError, TypeError, DecodeError, tf.errors.OpError) as e:
        raise ModelLoadError(f"{path}: {type(e).__name__}: {e}", _error_code(e)) from e
    _check_servable(path, servable)
    return servable


def dir_fingerprint(path: str) -> int | None:
    """A hash of the names, inodes, sizes and times of everything under `path`; None if it cannot be read.

    Inode and ctime are in it because a copy (shutil.copytree keeps mtimes) of the same files is a new push.
    On an object store: names, sizes and modification times of the objects under the prefix.
    """
    if remote_fs.is_remote(path):
        return _store_fingerprint(path)
    entries: list[tuple[Any, ...]] = []
    try:
        for root, dirs, files in os.walk(path, onerror=_raise):
            dirs.sort()
            for name in [".", *sorted(files)]:
                st = os.stat(os.path.join(root, name))
                entries.append(
                    (os.path.relpath(root, path), name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                )
    except OSError:
        return None
    return hash(tuple(entries))


def _raise(e: BaseException) -> None:
    raise e


def _store_fingerprint(path: str) -> int | None:
    entries: list[tuple[Any, ...]] = []
    try:
        for root, _dirs, files in tf.io.gfile.walk(path, onerror=_raise):
            for name in files:
                st = tf.io.gfile.stat(os.path.join(root, name))
                entries.append((root[len(path) :], name, st.length, st.mtime_nsec))
    except tf.errors.OpError:
        return None
    return hash(tuple(sorted(entries)))


@dataclasses.dataclass
class LoadFailure:
    """The last failed load of one version: what went wrong, and when to try again."""

    error_code: str
    error_message: str
    attempts: int
    fingerprint: int | None  # of the version directory just before the failed attempt
    retry_at: float  # on the manager's clock


class ModelManager:
    """Keeps the wanted versions of one model loaded: the newest `num_versions` plus any labelled ones.

    A newer version becomes the default as soon as it is loaded; versions are retired only once the
    versions that replace them are available, so a broken push leaves the previous version serving.
    A version that failed to load is tried again when its directory changes, or else after a backoff
    that starts at `load_retry_initial_s` and doubles per failed attempt up to `load_retry_max_s`.
    """

    def __init__(
        self,
        base_path: str,
        model_name: str,
        *,
        num_versions: int = 1,
        version_labels: Mapping[str, int] | None = None,
        loader: Callable[[str, int, str], Servable] = load_servable,
        freeze_gc: bool = False,
        load_retry_initial_s: float = 2.0,
        load_retry_max_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not MODEL_NAME_RE.fullmatch(model_name):
            raise ValueError(f"model name {model_name!r} must match {MODEL_NAME_RE.pattern}")
        if num_versions < 1:
            raise ValueError(f"num_versions must be >= 1, got {num_versions}")
        if not 0 < load_retry_initial_s <= load_retry_max_s:
            raise ValueError(
                f"need 0 < load_retry_initial_s <= load_retry_max_s, got {load_retry_initial_s}, {load_retry_max_s}"
            )
        remote_fs.enable_for([base_path])  # an object store's filesystem, for TensorFlow (tensorflow-io for s3://)
        self.base_path = base_path
        self.model_name = model_name
        self.num_versions = num_versions
        self.version_labels = dict(version_labels or {})
        self._loader = loader
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._available: dict[int, Servable] = {}
        self._history: dict[int, Servable] = {}  # every version ever loaded, for the status endpoint
        self._load_failures: dict[int, LoadFailure] = {}
        self._loading: set[int] = set()
        self.load_retry_initial_s = load_retry_initial_s
        self.load_retry_max_s = load_retry_max_s
        self._clock = clock
        self.freeze_gc = freeze_gc
        self._changes = 0  # loads and unloads so far
        self._changes_at_freeze = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- requests ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def acquire(self, version: int | None = None, label: str | None = None) -> Iterator[Servable]:
        """Hold one version for the duration of a request; it is not unloaded before it is released."""
        with self._lock:
            servable = self._lookup(version, label)
            servable.refcount += 1
        try:
            yield servable
        finally:
            with self._lock:
                servable.refcount -= 1
                if servable.refcount == 0 and servable.state is VersionState.UNLOADING:
                    self._finish_unload(servable)

    def _lookup(self, version: int | None, label: str | None) -> Servable:
        if label is not None:
            if label not in self.version_labels:
                raise ServableNotFoundError(f"Unrecognized servable version label: {label}")
            version = self.version_labels[label]
        if version is None:
            if not self._available:
                raise ServableNotFoundError(f"Servable not found for request: Latest({self.model_name})")
            return self._available[max(self._available)]
        servable = self._available.get(version)
        if servable is None:
            raise ServableNotFoundError(f"Servable not found for request: Specific({self.model_name}, {version})")
        return servable

    def status(self, version: int | None = None, label: str | None = None) -> list[dict[str, Any]]:
        """`model_version_status` entries as TF Serving's GetModelStatus returns them, newest first.

        A version whose last load failed is END with the error; one being loaded is LOADING.
        """
        with self._lock:
            if label is not None:
                if label not in self.version_labels:
                    raise ServableNotFoundError(f"Unrecognized servable version label: {label}")
                version = self.version_labels[label]
            ok = {"error_code": "OK", "error_message": ""}
            entries: dict[int, dict[str, Any]] = {
                v: {"version": str(v), "state": s.state.value, "status": ok} for v, s in self._history.items()
            }
            for v, failure in self._load_failures.items():
                status = {"error_code": failure.error_code, "error_message": failure.error_message}
                entries[v] = {"version": str(v), "state": VersionState.END.value, "status": status}
            for v in self._loading:
                entries[v] = {"version": str(v), "state": VersionState.LOADING.value, "status": ok}
            if version is None:
                if not entries:
                    raise ServableNotFoundError(f"Could not find any versions of model {self.model_name}")
                return [entries[v] for v in sorted(entries, reverse=True)]
            if version not in entries:
                raise ServableNotFoundError(f"Could not find version {version} of model {self.model_name}")
            return [entries[version]]

    # -- polling -------------------------------------------------------------------------------
    def scan(self) -> dict[int, str]:
        """Version directories on disk (integer names); hidden temp dirs of a push in progress are not."""
        found: dict[int, str] = {}
        if remote_fs.is_remote(self.base_path):
            for name in tf.io.gfile.listdir(self.base_path):
                name = name.rstrip("/")
                path = os.path.join(self.base_path, name)
                if VERSION_RE.fullmatch(name) and tf.io.gfile.isdir(path):
                    found[int(name)] = path
            return found
        with os.scandir(self.base_path) as entries:
            for entry in entries:
                if VERSION_RE.fullmatch(entry.name) and entry.is_dir():
                    found[int(entry.name)] = entry.path
        return found

    def poll_once(self) -> None:
        """Load wanted versions that are not loaded yet, then retire the loaded ones no longer wanted."""
        with self._poll_lock:
            try:
                on_disk = self.scan()
            except (OSError, tf.errors.OpError) as e:
                log.warning("cannot list model base path %s: %s; keeping the loaded versions", self.base_path, e)
                return
            with self._lock:
                for version in self._load_failures.keys() - on_disk.keys():  # gone: nothing left to retry
                    del self._load_failures[version]
            keep: set[int] = set()
            for version in sorted(on_disk, reverse=True):
                if len(keep) >= self.num_versions:
                    break
                if self._ensure_loaded(version, on_disk[version]):
                    keep.add(version)
            for version in set(self.version_labels.values()) & on_disk.keys():
                if self._ensure_loaded(version, on_disk[version]):
                    keep.add(version)
            with self._lock:
                for version in set(self._available) - keep:
                    self._retire(self._available.pop(version))
            if self.freeze_gc and self._changes != self._changes_at_freeze:
                self._changes_at_freeze = self._changes
                refreeze_gc()

    def _ensure_loaded(self, version: int, path: str) -> bool:
        with self._lock:
            if version in self._available:
                return True
            failure = self._load_failures.get(version)
        fingerprint = dir_fingerprint(path)
        # An unreadable directory (fingerprint None) counts as unchanged: only the backoff retries it.
        changed = failure is None or fingerprint != failure.fingerprint
        if not changed and self._clock() < failure.retry_at:
            return False  # the same broken content: wait for the backoff, log nothing
        with self._lock:
            self._loading.add(version)
        try:
            servable = self._loader(self.model_name, version, path)
        except ModelLoadError as e:
            attempts = 1 if changed else failure.attempts + 1
            delay = min(self.load_retry_initial_s * 2 ** (attempts - 1), self.load_retry_max_s)
            with self._lock:
                self._load_failures[version] = LoadFailure(
                    e.error_code, str(e), attempts, fingerprint, self._clock() + delay
                )
            log.warning(
                "model %s version %d failed to load (attempt %d): %s; retrying when its directory changes or in %.0f s",
                self.model_name,
                version,
                attempts,
                e,
                delay,
            )
            return False
        finally:
            with self._lock:
                self._loading.discard(version)
        with self._lock:
            self._load_failures.pop(version, None)
            self._available[version] = servable
            self._history[version] = servable
            self._changes += 1
        log.info("model %s version %d is available", self.model_name, version)
        return True

    def _retire(self, servable: Servable) -> None:
        # Called with self._lock held; the servable is no longer reachable by new requests.
        servable.state = VersionState.UNLOADING
        log.info(
            "model %s version %d: unloading (%d requests in flight)",
            self.model_name,
            servable.version,
            servable.refcount,
        )
        if servable.refcount == 0:
            self._finish_unload(servable)

    def _finish_unload(self, servable: Servable) -> None:
        servable._release_model()
        self._changes += 1
        log.info("model %s version %d unloaded", self.model_name, servable.version)

    def start_polling(self, interval_s: float) -> None:
        """Poll the base path every `interval_s` seconds in a daemon thread until `stop()`."""
        if interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll_loop, args=(interval_s,), name="model-poller", daemon=True)
        self._thread.start()

    def _poll_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.poll_once()
            except Exception:
                log.exception("polling %s failed; retrying in %.1f s", self.base_path, interval_s)

    def stop(self) -> None:
        """Stop polling and retire every version (each one unloads once its requests have finished)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for version in list(self._available):
                self._retire(self._available.pop(version))
