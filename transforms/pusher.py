"""Pusher: copy a blessed model into a TF Serving model base path as a new integer version, never over an unjudged one.

Layout: `serving_model_dir/<version>/` holds the SavedModel (the Model artifact's `Format-Serving`
directory) and `assets.extra/push_record.json`, which says which model, blessing and baseline the
version came from (`assets.extra` is SavedModel's place for files the serving side reads and the graph
does not). Versions are max(existing integer versions) + 1, starting at 1: small, strictly
increasing while old versions are kept, and never in the future (a timestamp version would make a
clock jump or a manual push shadow later ones). The copy goes to a hidden temp directory next to the
versions, record included, and is renamed into place, so a model server polling the base path never
sees a partial version and a version never exists without its record.

Concurrent runs: each run's Evaluator judges its model against a baseline resolved from ML Metadata
at launch, so two runs launched close together judge against the same baseline, and without a check
whichever finishes last would be served, however it compares with the other. A push is therefore a
compare-and-set on the serving directory. Under an exclusive lock on `<serving_model_dir>/.push.lock`,
right before the rename, the Pusher reads which model the newest version holds and pushes only if
its own model was judged against that one: nothing is served yet, or the served model is the
blessing's baseline, or that baseline's baseline, and so on (each blessing means "not worse than my
baseline"; the driver resolves the chain from the Evaluator's blessings in ML Metadata). Otherwise
the model was never compared with what is served: pushed=0, and the message names the served model,
its version and the run that pushed it. The next run's Evaluator takes the served model's blessing as
its baseline. The check applies when the Evaluator has change thresholds, the only case where a
blessing is relative to another model; with value thresholds alone a newer blessed model simply
becomes the newest version.

Why the serving directory, not ML Metadata, is the source of truth: the Pusher runs inside the Beam
graph (on a worker on remote runners) and only the driver writes ML Metadata, after it sees commit
markers, so another run's push is visible in the serving directory the moment it is renamed and in ML
Metadata only when that run's driver next polls. The serving directory is also what TF Serving
serves, and the lock lives on the same filesystem as the rename it protects. The lock is `flock`,
not a file created with O_EXCL: the kernel releases it when its holder dies, so a push killed with
`kill -9` cannot wedge the directory, where an O_EXCL file would outlive it and leave staleness to be
guessed (Linux NFS clients implement flock as byte-range locks, so it also holds across hosts there).
Versions written before push records existed are identified by this Pusher's PushedModel records in
ML Metadata; a newest version that neither names (a manual copy) is never assumed to be worse: a
guarded push refuses to shadow it.

Only the local filesystem is supported as destination: atomic directory rename is what makes the
push safe, and object stores have none.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import MODEL, MODEL_BLESSING, PUSHED_MODEL, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineDefinitionError, PipelineRunError

log = logging.getLogger(__name__)

SERVING_MODEL_DIR = "Format-Serving"
RESULT_FILE = "push_result.json"
PUSH_RECORD = os.path.join("assets.extra", "push_record.json")  # inside each version directory
LOCK_FILE = ".push.lock"
LOCK_TIMEOUT_S = 600.0  # the lock covers a check and a rename, never a copy: waiting this long means a hung holder
_LOCK_POLL_S = 0.05
_TEMP_PREFIX = ".push-tmp-"
_MAX_RENAME_ATTEMPTS = 100


class PushRefused(Exception):
    """The compare-and-set failed: the served model is not one the model to push was judged against."""

    def __init__(self, reason: str, served: Served):
        super().__init__(reason)
        self.served = served


def check_writable(directory: str) -> None:
    """Raise unless `directory` exists and accepts new entries, or could be created.

    Probes by creating and removing an entry (permission bits alone say nothing for root or on a
    read-only mount). A directory that does not exist yet is judged by its nearest existing parent.
    """
    probe_dir = os.path.abspath(directory)
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    try:
        if not os.path.isdir(probe_dir):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", probe_dir)
        probe = os.path.join(probe_dir, f"{_TEMP_PREFIX}probe-{uuid.uuid4().hex}")
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise PipelineDefinitionError(
            f"serving_model_dir {directory!r} is not writable ({e.strerror or e}: {probe_dir})"
        ) from None


def existing_versions(serving_model_dir: str) -> list[int]:
    """Integer version directories under the model base path (TF Serving ignores everything else)."""
    if not os.path.isdir(serving_model_dir):
        return []
    return sorted(int(n) for n in os.listdir(serving_model_dir) if n.isdigit())


@dataclasses.dataclass(frozen=True)
class Served:
    """The newest version under a serving directory and what is known of the model in it."""

    version: int
    destination: str
    model_uri: str | None  # None: neither a push record nor ML Metadata says which model it is
    pushed_by: str | None = None

    def describe(self) -> str:
        model = f"model {self.model_uri}" if self.model_uri else "a model no push record names"
        by = f", pushed by {self.pushed_by}" if self.pushed_by else ""
        return f"version {self.version} ({model}{by})"


def read_push_record(version_dir: str) -> dict[str, Any] | None:
    """The push record of one version directory; None when it has none (pushed by hand or by an older Pusher)."""
    path = os.path.join(version_dir, PUSH_RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PipelineRunError(f"push record {path} is unreadable ({e}); expected the JSON a Pusher writes") from None
    if not isinstance(record, dict) or not isinstance(record.get("model_uri"), str):
        raise PipelineRunError(f"push record {path} has no model_uri string; expected the JSON a Pusher writes")
    return record


def served_model(serving_model_dir: str, known_pushes: Mapping[str, str] | None = None) -> Served | None:
    """The newest version and its model, from its push record or else `known_pushes` (destination -> model URI)."""
    versions = existing_versions(serving_model_dir)
    if not versions:
        return None
    destination = os.path.join(serving_model_dir, str(versions[-1]))
    record = read_push_record(destination)
    if record is not None:
        return Served(versions[-1], destination, record["model_uri"], record.get("pushed_by"))
    return Served(versions[-1], destination, (known_pushes or {}).get(destination))


@dataclasses.dataclass(frozen=True)
class Guard:
    """The compare-and-set condition of one push: which served models its model was judged not worse than."""

    model_uri: str
    baseline_uri: str | None  # the blessing's baseline; None when nothing was blessed before
    judged_against: frozenset[str]  # the baseline, its baseline, ...

    def check(self, served: Served | None) -> None:
        """Raise PushRefused unless pushing over `served` is safe."""
        reason = self.refusal(served)
        if reason is not None and served is not None:  # nothing served is always safe
            raise PushRefused(reason, served)

    def refusal(self, served: Served | None) -> str | None:
        """Why pushing over `served` could regress what is served, or None when it cannot."""
        if served is None or served.model_uri == self.model_uri or served.model_uri in self.judged_against:
            return None
        against = f"baseline {self.baseline_uri}" if self.baseline_uri else "no baseline (nothing was blessed yet)"
        if served.model_uri is None:
            return (
                f"model {self.model_uri} not pushed: the newest version under {os.path.dirname(served.destination)} "
                f"is {served.describe()}, so this model, judged against {against}, was never compared with it. "
                f"Remove {served.destination} if it should not be served, then rerun"
            )
        return (
            f"model {self.model_uri} not pushed: {served.describe()} won; it became the newest version under "
            f"{os.path.dirname(served.destination)} after this model was judged against {against}, and the two "
            "were never compared, so pushing could regress what is served. Rerun the pipeline to judge a "
            f"model against {served.model_uri}"
        )


def judged_against(baseline_uri: str | None, baselines: Mapping[str, list[str]]) -> frozenset[str]:
    """The baseline and, transitively, the baselines its blessings were judged against (model URI -> baselines)."""
    seen: set[str] = set()
    todo = [baseline_uri] if baseline_uri else []
    while todo:
        uri = todo.pop()
        if uri not in seen:
            seen.add(uri)
            todo.extend(baselines.get(uri, ()))
    return frozenset(seen)


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
) -> tuple[int, str]:
    """Copy `model_dir` to the next version under `serving_model_dir`; returns (version, destination).

    `record` (with at least `model_uri`) becomes the version's push record. With a `guard`, the newest
    version is checked before the copy and again under the lock right before the rename; when the
    guard refuses, PushRefused says why and nothing is left behind.
    """
    check_writable(serving_model_dir)
    os.makedirs(serving_model_dir, exist_ok=True)
    if guard is not None:
        guard.check(served_model(serving_model_dir, known_pushes))  # early, to spare the copy; again under the lock
    temp = os.path.join(serving_model_dir, f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        _copy_tree(model_dir, temp)
        if record is not None:
            artifact_io.write_text(os.path.join(temp, PUSH_RECORD), json.dumps(dict(record), indent=2, sort_keys=True))
        with serving_lock(serving_model_dir, lock_timeout_s):
            if guard is not None:
                guard.check(served_model(serving_model_dir, known_pushes))
            for _ in range(_MAX_RENAME_ATTEMPTS):
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
            f"serving_model_dir {serving_model_dir!r}: no free version after {_MAX_RENAME_ATTEMPTS} attempts"
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


def _same_channel(a: Channel | None, b: Channel | None) -> bool:
    return a is not None and b is not None and a.producer is b.producer and a.name == b.name


class Pusher(Component):
    """Push the model to `serving_model_dir/<version>/` when its blessing says blessed=1.

    Output `pushed_model`: properties pushed (0/1), pushed_destination, pushed_version and
    push_message, and `push_result.json` with the same facts. A model that is not blessed is not
    pushed (pushed=0, with the Evaluator's reason); nor is a blessed one when, with change
    thresholds, another run pushed a model it was not judged against (pushed=0, naming that model).
    Reruns when the versions in the serving directory change: whether a push is needed depends on
    the serving directory, not only on the inputs.
    """

    INPUTS = {"model": InputSpec(MODEL), "blessing": InputSpec(MODEL_BLESSING)}
    OUTPUTS = {"pushed_model": PUSHED_MODEL}
    FINGERPRINT_AFTER_RUN = True  # the key records the versions as this push left them
    # Its key holds the serving directory's versions as the push left them, so a rerun finds it.
    FINGERPRINT_AFTER_RUN = True

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
        if "://" in serving_model_dir:
            raise PipelineDefinitionError(
                f"serving_model_dir {serving_model_dir!r}: only local directories are supported "
                "(the push is an atomic directory rename)"
            )
        judged = getattr(getattr(blessing, "producer", None), "inputs", {}).get("model")
        if judged is not None and not _same_channel(judged, model):
            raise PipelineDefinitionError(
                f"Pusher: the blessing comes from {blessing.producer.id}, which judges {judged!r}, but the model "
                f"to push is {model!r}: wire the Pusher to the model its Evaluator judged"
            )
        super().__init__(
            inputs={"model": model, "blessing": blessing},
            params={"serving_model_dir": os.path.abspath(serving_model_dir)},
            component_id=component_id,
        )

    def external_fingerprint(self, inputs=None) -> str:
        """The versions now in serving_model_dir: if someone removed or added one, push again."""
        directory = self.params["serving_model_dir"]
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
