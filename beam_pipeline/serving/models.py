"""Loading, versioning and reference counting of the SavedModels under a model base path.

The layout is TF Serving's: `<model_base_path>/<integer version>/saved_model.pb`. A poll of the base path
loads versions that appeared and retires versions that are no longer wanted; a retired version stays in
memory until the last request that acquired it has released it, so a push never breaks a request that
is already running.
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
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from beam_pipeline.serving.errors import BadRequestError, ModelLoadError, ServableNotFoundError
from beam_pipeline.serving.names import MODEL_NAME_RE, VERSION_RE

log = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.pb"


class VersionState(enum.Enum):
    """The lifecycle states TF Serving reports in `model_version_status`."""

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


def load_servable(name: str, version: int, path: str) -> Servable:
    """Load the SavedModel of one version directory; raise ModelLoadError when it is incomplete or broken."""
    try:
        with open(os.path.join(path, SAVED_MODEL_FILE), "rb") as f:
            saved_model = saved_model_pb2.SavedModel.FromString(f.read())
        meta_graphs = [mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags]
        if not meta_graphs:
            raise ModelLoadError(f"{path}: no MetaGraph tagged 'serve'")
        model = tf.saved_model.load(path, tags=["serve"])
    except (OSError, ValueError, LookupError, DecodeError, tf.errors.OpError) as e:
        raise ModelLoadError(f"{path}: {type(e).__name__}: {e}") from e
    return Servable(name, version, path, model, dict(model.signatures), meta_graphs[0].signature_def)


class ModelManager:
    """Keeps the wanted versions of one model loaded: the newest `num_versions` plus any labelled ones.

    A newer version becomes the default as soon as it is loaded; versions are retired only once the
    versions that replace them are available, so a broken push leaves the previous version serving.
    """

    def __init__(
        self,
        base_path: str,
        model_name: str,
        *,
        num_versions: int = 1,
        version_labels: Mapping[str, int] | None = None,
        loader: Any = load_servable,
        freeze_gc: bool = False,
    ):
        if not MODEL_NAME_RE.fullmatch(model_name):
            raise ValueError(f"model name {model_name!r} must match {MODEL_NAME_RE.pattern}")
        if num_versions < 1:
            raise ValueError(f"num_versions must be >= 1, got {num_versions}")
        self.base_path = base_path
        self.model_name = model_name
        self.num_versions = num_versions
        self.version_labels = dict(version_labels or {})
        self._loader = loader
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._available: dict[int, Servable] = {}
        self._history: dict[int, Servable] = {}  # every version ever loaded, for the status endpoint
        self._load_failures: dict[int, str] = {}
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
        """`model_version_status` entries as TF Serving's GetModelStatus returns them."""
        with self._lock:
            if label is not None:
                if label not in self.version_labels:
                    raise ServableNotFoundError(f"Unrecognized servable version label: {label}")
                version = self.version_labels[label]
            if version is None:
                servables = sorted(self._history.values(), key=lambda s: -s.version)
                if not servables:
                    raise ServableNotFoundError(f"Could not find any versions of model {self.model_name}")
            elif version in self._history:
                servables = [self._history[version]]
            else:
                raise ServableNotFoundError(f"Could not find version {version} of model {self.model_name}")
            return [
                {
                    "version": str(s.version),
                    "state": s.state.value,
                    "status": {"error_code": "OK", "error_message": ""},
                }
                for s in servables
            ]

    # -- polling -------------------------------------------------------------------------------
    def scan(self) -> dict[int, str]:
        """Complete version directories on disk: integer name and a saved_model.pb inside."""
        found: dict[int, str] = {}
        with os.scandir(self.base_path) as entries:
            for entry in entries:
                if not VERSION_RE.fullmatch(entry.name) or not entry.is_dir():
                    continue
                if os.path.isfile(os.path.join(entry.path, SAVED_MODEL_FILE)):
                    found[int(entry.name)] = entry.path
        return found

    def poll_once(self) -> None:
        """Load wanted versions that are not loaded yet, then retire the loaded ones no longer wanted."""
        with self._poll_lock:
            try:
                on_disk = self.scan()
            except OSError as e:
                log.warning("cannot list model base path %s: %s; keeping the loaded versions", self.base_path, e)
                return
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
        try:
            servable = self._loader(self.model_name, version, path)
        except ModelLoadError as e:
            # Usually a version still being copied: try again at the next poll, warn once per distinct error.
            level = logging.DEBUG if self._load_failures.get(version) == str(e) else logging.WARNING
            log.log(level, "model %s version %d not loaded: %s", self.model_name, version, e)
            self._load_failures[version] = str(e)
            return False
        self._load_failures.pop(version, None)
        with self._lock:
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
