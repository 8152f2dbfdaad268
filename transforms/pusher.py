"""Pusher: copy a blessed model into a TF Serving model base path as a new integer version, never over an unjudged one.

Layout: `serving_model_dir/<version>/` holds the SavedModel (the Model artifact's `Format-Serving`
directory) and `assets.extra/push_record.json`, which says which model, blessing and baseline the
version came from (`assets.extra` is SavedModel's place for files the serving side reads and the graph
does not). Versions are max(existing integer versions) + 1, starting at 1: small, strictly
increasing while old versions are kept, and never in the future (a timestamp version would make a
clock jump or a manual push shadow later ones). Before a version is published, a guarded push checks
that what is served is a model its own was judged against (transforms/_push_record.py says why).

Local directories (here): the copy goes to a hidden temp directory next to the versions, record
included, and is renamed into place, so a model server polling the base path never sees a partial
version and a version never exists without its record. The check and the rename happen under an
exclusive lock on `<serving_model_dir>/.push.lock`. The lock is `flock`, not a file created with
O_EXCL: the kernel releases it when its holder dies, so a push killed with `kill -9` cannot wedge the
directory, where an O_EXCL file would outlive it and leave staleness to be guessed (Linux NFS clients
implement flock as byte-range locks, so it also holds across hosts there). Object stores have neither
rename nor locks: transforms/_push_store.py pushes there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io, remote_fs
from beam_pipeline.artifacts import MODEL, MODEL_BLESSING, PUSHED_MODEL, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineDefinitionError, PipelineRunError
from transforms import _push_store
from transforms._push_record import (
    MAX_VERSION_ATTEMPTS,
    PUSH_RECORD,
    TEMP_PREFIX,
    Guard,
    PushRefused,
    Served,
    judged_against,
    read_push_record,
)
from transforms._push_record import SAVED_MODEL_FILE as SAVED_MODEL_FILE  # re-exported: the layout's marker file
from transforms._push_store import STALE_AFTER_S, STORES

log = logging.getLogger(__name__)

SERVING_MODEL_DIR = "Format-Serving"
RESULT_FILE = "push_result.json"
LOCK_FILE = ".push.lock"
LOCK_TIMEOUT_S = 600.0  # the lock covers a check and a rename, never a copy: waiting this long means a hung holder
_LOCK_POLL_S = 0.05


def check_writable(directory: str) -> None:
    """Raise unless `directory` exists and accepts new entries, or could be created.

    Probes by creating and removing an entry (permission bits alone say nothing for root or on a
    read-only mount). A directory that does not exist yet is judged by its nearest existing parent;
    on an object store, by creating and removing an object under it.
    """
    if remote_fs.is_remote(directory):
        _push_store.check_writable(directory)
        return
    probe_dir = os.path.abspath(directory)
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    try:
        if not os.path.isdir(probe_dir):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", probe_dir)
        probe = os.path.join(probe_dir, f"{TEMP_PREFIX}probe-{uuid.uuid4().hex}")
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise PipelineDefinitionError(
            f"serving_model_dir {directory!r} is not writable ({e.strerror or e}: {probe_dir})"
        ) from None


def existing_versions(serving_model_dir: str) -> list[int]:
    """Integer version directories under the model base path (TF Serving ignores everything else).

    On an object store a version directory is a prefix holding objects, complete or not.
    """
    if remote_fs.is_remote(serving_model_dir):
        return _push_store.versions(serving_model_dir)
    if not os.path.isdir(serving_model_dir):
        return []
    return sorted(int(n) for n in os.listdir(serving_model_dir) if n.isdigit())


def served_model(serving_model_dir: str, known_pushes: Mapping[str, str] | None = None) -> Served | None:
    """The newest version and its model, from its push record or else `known_pushes` (destination -> model URI).

    On an object store, the newest complete version (one with saved_model.pb): what a server loads.
    """
    if remote_fs.is_remote(serving_model_dir):
        return _push_store.served(serving_model_dir, known_pushes)
    versions = existing_versions(serving_model_dir)
    if not versions:
        return None
    destination = os.path.join(serving_model_dir, str(versions[-1]))
    return Served.of(versions[-1], destination, read_push_record(destination), known_pushes)


@contextlib.contextmanager
def serving_lock(serving_model_dir: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the serving directory's push lock (flock on `.push.lock`, released by the kernel if the holder dies)."""
    path = os.path.join(serving_model_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    raise PipelineRunError(
                        f"serving_model_dir {serving_model_dir!r}: another push has held {path} for over "
                        f"{timeout_s:g} s (holder: {holder}); if that process hangs, stop it"
                    ) from None
                time.sleep(_LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _copy_tree(src: str, dst: str) -> None:
    """Copy every file under `src` (any Beam filesystem) into the local directory `dst`."""
    os.makedirs(dst)
    matches = FileSystems.match([artifact_io.join(src, "**")])[0].metadata_list
    if not matches:
        raise PipelineDefinitionError(f"model directory {src!r} is empty or missing: nothing to push")
    prefix = src.rstrip("/") + "/"
    for m in matches:
        target = os.path.join(dst, *m.path[len(prefix) :].split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(m.path, compression_type="uncompressed") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def push_model(
    model_dir: str,
    serving_model_dir: str,
    *,
    record: Mapping[str, Any] | None = None,
    guard: Guard | None = None,
    known_pushes: Mapping[str, str] | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    stale_after_s: float = STALE_AFTER_S,
) -> tuple[int, str]:
    """Copy `model_dir` to the next version under `serving_model_dir`; returns (version, destination).

    `record` (with at least `model_uri`) becomes the version's push record. With a `guard`, the newest
    version is checked before the copy and again under the lock right before the rename; when the
    guard refuses, PushRefused says why and nothing is left behind. On an object store
    (transforms/_push_store.py) `record` is required, since it claims the version, and a version left
    incomplete by a push that died is taken for abandoned after `stale_after_s` without a write.
    """
    if remote_fs.is_remote(serving_model_dir):
        return _push_store.push(
            model_dir,
            serving_model_dir,
            record=record,
            guard=guard,
            known_pushes=known_pushes,
            timeout_s=lock_timeout_s,
            stale_after_s=stale_after_s,
        )
    check_writable(serving_model_dir)
    os.makedirs(serving_model_dir, exist_ok=True)
    if guard is not None:
        guard.check(served_model(serving_model_dir, known_pushes))  # early, to spare the copy; again under the lock
    temp = os.path.join(serving_model_dir, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        _copy_tree(model_dir, temp)
        if record is not None:
            artifact_io.write_text(os.path.join(temp, PUSH_RECORD), json.dumps(dict(record), indent=2, sort_keys=True))
        with serving_lock(serving_model_dir, lock_timeout_s):
            if guard is not None:
                guard.check(served_model(serving_model_dir, known_pushes))
            for _ in range(MAX_VERSION_ATTEMPTS):
                version = max(existing_versions(serving_model_dir), default=0) + 1
                destination = os.path.join(serving_model_dir, str(version))
                try:
                    # Fails when a push outside the lock (by hand, an older Pusher) took this number: its
                    # directory is not empty. No reserving mkdir, which would show the server an empty version.
                    os.rename(temp, destination)
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue
                    raise
                return version, destination
        raise PipelineDefinitionError(
            f"serving_model_dir {serving_model_dir!r}: no free version after {MAX_VERSION_ATTEMPTS} attempts"
        )
    except OSError as e:
        raise PipelineDefinitionError(
            f"pushing {model_dir!r} to serving_model_dir {serving_model_dir!r} failed: {e}"
        ) from None
    finally:
        if os.path.exists(temp):
            shutil.rmtree(temp, ignore_errors=True)


class _Push:
    """Runs once, after the blessing and the model are committed: push or explain why not."""

    def __init__(
        self,
        serving_model_dir: str,
        result_uri: str,
        *,
        pushed_by: str,
        known_pushes: Mapping[str, str],
        baselines: Mapping[str, list[str]] | None,
    ):
        self.serving_model_dir = serving_model_dir
        self.result_uri = result_uri
        self.pushed_by = pushed_by
        self.known_pushes = dict(known_pushes)
        self.baselines = None if baselines is None else dict(baselines)  # None: blessings are not relative

    def __call__(self, blessing: Artifact, model: Artifact) -> dict[str, Any]:
        blessed_model = blessing.properties.get("model_uri")
        if blessed_model is not None and blessed_model != model.uri:
            raise PipelineDefinitionError(
                f"the blessing {blessing.uri} is for model {blessed_model!r}, not for {model.uri!r}: "
                "wire the Pusher to the same model as the Evaluator"
            )
        properties: dict[str, Any]
        if int(blessing.properties.get("blessed", 0)) != 1:
            why = blessing.properties.get("blessing_message") or "the blessing says blessed=0"
            message = f"model {model.uri} is not blessed; nothing pushed to {self.serving_model_dir} ({why})"
            log.warning("%s", message)
            properties = {"pushed": 0, "push_message": message}
        else:
            properties = self._push(blessing, model)
        properties["model_uri"] = model.uri
        record = {**properties, "blessing_uri": blessing.uri}
        text = json.dumps(record, indent=2, sort_keys=True)
        artifact_io.write_text(artifact_io.join(self.result_uri, RESULT_FILE), text)
        return properties

    def _push(self, blessing: Artifact, model: Artifact) -> dict[str, Any]:
        served = served_model(self.serving_model_dir, self.known_pushes)
        if served is not None and served.model_uri == model.uri:
            message = f"model {model.uri} is already version {served.version} at {served.destination}; not copied again"
            log.info("%s", message)
            return {"pushed": 1, "pushed_destination": served.destination, "pushed_version": served.version,
                    "push_message": message}  # fmt: skip
        baseline = blessing.properties.get("baseline_model_uri")
        guard = None
        if self.baselines is not None:
            guard = Guard(model.uri, baseline, judged_against(baseline, self.baselines))
        record = {"model_uri": model.uri, "blessing_uri": blessing.uri, "baseline_model_uri": baseline,
                  "pushed_by": self.pushed_by}  # fmt: skip
        source = artifact_io.join(model.uri, SERVING_MODEL_DIR)
        try:
            version, destination = push_model(
                source, self.serving_model_dir, record=record, guard=guard, known_pushes=self.known_pushes
            )
        except PushRefused as refused:
            log.warning("%s", refused)
            served = refused.served
            # push_refused + blessing_uri let an Evaluator tell a blessing that lost the race from the served one.
            return {"pushed": 0, "push_refused": 1, "push_message": str(refused), "blessing_uri": blessing.uri,
                    "served_version": served.version, "served_model_uri": served.model_uri}  # fmt: skip
        message = f"pushed model {model.uri} as version {version} to {destination}"
        log.info("%s", message)
        return {"pushed": 1, "pushed_destination": destination, "pushed_version": version, "push_message": message}


def _normalized(serving_model_dir: str) -> str:
    """An absolute local path, or the object-store URI without a trailing slash."""
    if remote_fs.is_remote(serving_model_dir):
        return serving_model_dir.rstrip("/")
    return os.path.abspath(serving_model_dir)


def _same_channel(a: Channel | None, b: Channel | None) -> bool:
    return a is not None and b is not None and a.producer is b.producer and a.name == b.name


class Pusher(Component):
    """Push the model to `serving_model_dir/<version>/` (a local directory, s3:// or gs://) when blessed=1.

    Output `pushed_model`: properties pushed (0/1), pushed_destination, pushed_version and
    push_message, and `push_result.json` with the same facts. A model that is not blessed is not
    pushed (pushed=0, with the Evaluator's reason); nor is a blessed one when, with change
    thresholds, another run pushed a model it was not judged against (pushed=0, naming that model).
    Reruns when the versions in the serving directory change: whether a push is needed depends on
    the serving directory, not only on the inputs.
    """

    INPUTS = {"model": InputSpec(MODEL), "blessing": InputSpec(MODEL_BLESSING)}
    OUTPUTS = {"pushed_model": PUSHED_MODEL}
    FINGERPRINT_AFTER_RUN = True  # the key records the versions as this push left them, so a rerun finds it

    def __init__(
        self,
        *,
        model: Channel,
        blessing: Channel,
        serving_model_dir: str,
        component_id: str | None = None,
    ):
        if not serving_model_dir:
            raise PipelineDefinitionError("Pusher needs serving_model_dir, the model base path TF Serving watches")
        if "://" in serving_model_dir and remote_fs.scheme(serving_model_dir) not in STORES:
            raise PipelineDefinitionError(
                f"serving_model_dir {serving_model_dir!r}: supported are local directories and "
                f"{', '.join(s + '://' for s in STORES)} (a push needs an atomic rename or a conditional create)"
            )
        judged = getattr(getattr(blessing, "producer", None), "inputs", {}).get("model")
        if judged is not None and not _same_channel(judged, model):
            raise PipelineDefinitionError(
                f"Pusher: the blessing comes from {blessing.producer.id}, which judges {judged!r}, but the model "
                f"to push is {model!r}: wire the Pusher to the model its Evaluator judged"
            )
        super().__init__(
            inputs={"model": model, "blessing": blessing},
            params={"serving_model_dir": _normalized(serving_model_dir)},
            component_id=component_id,
        )

    def external_fingerprint(self, inputs=None) -> str:
        """The versions now in serving_model_dir: if someone removed or added one, push again.

        On an object store, the complete versions (with saved_model.pb) and their objects' sizes, from
        one listing: nothing is downloaded, and a push in progress or abandoned does not count.
        """
        directory = self.params["serving_model_dir"]
        if remote_fs.is_remote(directory):
            return _push_store.fingerprint(directory)
        versions = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        return json.dumps([v for v in versions if v.isdigit()])

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """What the push is checked against, from ML Metadata (read here: only the driver talks to it).

        `known_pushes`: which model each of this Pusher's past destinations got, for versions pushed
        before push records existed. `baselines` (only when the blessing's producer has change
        thresholds): for each model its blessings judged, the baselines it was judged against.
        """
        known: dict[str, str] = {}
        pushes = store.latest_artifacts(PUSHED_MODEL.name, pipeline_name, {"pushed": 1, "producer_component": self.id})
        for push in pushes:  # newest first: a destination pushed twice holds its latest model
            destination, model_uri = push.properties.get("pushed_destination"), push.properties.get("model_uri")
            if destination and model_uri:
                known.setdefault(str(destination), str(model_uri))
        resolved: dict[str, Any] = {"known_pushes": known} if known else {}
        producer = self.inputs["blessing"].producer
        if getattr(producer, "has_change_thresholds", False):
            edges: dict[str, set[str]] = {}
            criteria = {"blessed": 1, "producer_component": producer.id}
            for b in store.latest_artifacts(MODEL_BLESSING.name, pipeline_name, criteria):
                model_uri, baseline = b.properties.get("model_uri"), b.properties.get("baseline_model_uri")
                if model_uri and baseline:
                    edges.setdefault(str(model_uri), set()).add(str(baseline))
            resolved["baselines"] = {uri: sorted(bases) for uri, bases in sorted(edges.items())}
        return resolved

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Fail before any training is spent on a model that could not be pushed.
        check_writable(self.params["serving_model_dir"])
        return {"pushed_model": {}}

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        push = _Push(
            self.params["serving_model_dir"],
            ctx.output_uri("pushed_model"),
            pushed_by=f"{ctx.pipeline_name} run {ctx.run_id}",
            known_pushes=ctx.resolved.get("known_pushes", {}),
            baselines=ctx.resolved.get("baselines"),
        )
        pushed = inputs["blessing"] | "Push" >> beam.Map(push, beam.pvalue.AsSingleton(inputs["model"]))
        ctx.publish("pushed_model", pushed)
        return {}
