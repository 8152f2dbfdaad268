"""Pusher: copy a blessed model into a TF Serving model base path as a new integer version, never over an unjudged one.

Layout: `serving_model_dir/<version>/` holds the SavedModel (the Model artifact's `Format-Serving`
directory) and `assets.extra/push_record.json`, which says which model, blessing and baseline the
version came from (`assets.extra` is SavedModel's place for files the serving side reads and the graph
does not). Versions are max(existing integer versions) + 1, starting at 1: small, strictly
increasing while old versions are kept, and never in the future (a timestamp version would make a
clock jump or a manual push shadow later ones).

Concurrent runs: each run's Evaluator judges its model against a baseline resolved from ML Metadata
at launch, so two runs launched close together judge against the same baseline, and without a check
whichever finishes last would be served, however it compares with the other. A push is therefore a
compare-and-set on the serving directory: right before a version is published, the Pusher reads which
model the newest version holds and pushes only if its own model was judged against that one: nothing
is served yet, or the served model is the blessing's baseline, or that baseline's baseline, and so on
(each blessing means "not worse than my baseline"; the driver resolves the chain from the Evaluator's
blessings in ML Metadata). Otherwise the model was never compared with what is served: pushed=0, and
the message names the served model, its version and the run that pushed it. The next run's Evaluator
takes the served model's blessing as its baseline. The check applies when the Evaluator has change
thresholds, the only case where a blessing is relative to another model; with value thresholds alone
a newer blessed model simply becomes the newest version.

Local directories: the copy goes to a hidden temp directory next to the versions, record included,
and is renamed into place, so a model server polling the base path never sees a partial version and
a version never exists without its record. The check and the rename happen under an exclusive lock
on `<serving_model_dir>/.push.lock`. The lock is `flock`, not a file created with O_EXCL: the kernel
releases it when its holder dies, so a push killed with `kill -9` cannot wedge the directory, where an
O_EXCL file would outlive it and leave staleness to be guessed (Linux NFS clients implement flock as
byte-range locks, so it also holds across hosts there).

Object stores (`s3://`, `gs://`) have neither rename nor locks, but both create an object only if
none exists, atomically (S3: PutObject with `If-None-Match: *`; GCS: `ifGenerationMatch=0`). A model
not already on the same store is first uploaded under a hidden `.push-tmp-<id>/` prefix. Then the
version number is claimed by creating `<version>/assets.extra/push_record.json` conditionally: of two
pushes that chose the same number, exactly one gets it; the other lists again and re-checks. The
claim is made right after the compare-and-set check on a fresh listing, and a version whose claim
exists but whose `saved_model.pb` does not yet is a push in progress: a later push waits for it to
complete (then checks against it) rather than shadow it. The model's objects are copied in by the
store (server-side copies, seconds), `saved_model.pb` last, after checking that every other object is
in place: TF Serving and `beam-pipeline serve` load a version only once its `saved_model.pb` exists,
so a polling server never loads a partial one. A push that fails removes its own claim and objects.
One killed outright leaves a version without `saved_model.pb`, which no server loads; after
STALE_AFTER_S without a write it counts as abandoned: the next push takes the number above it and
then deletes it. Staleness compares the store's object times with this host's clock, so it assumes
clocks within minutes of each other and that no push stalls for STALE_AFTER_S / 2 between its last
check and its final write (a push that did refuses to write its saved_model.pb).

Why the serving directory, not ML Metadata, is the source of truth: the Pusher runs inside the Beam
graph (on a worker on remote runners) and only the driver writes ML Metadata, after it sees commit
markers, so another run's push is visible in the serving directory the moment it is published and in
ML Metadata only when that run's driver next polls. The serving directory is also what TF Serving
serves. Versions written before push records existed are identified by this Pusher's PushedModel
records in ML Metadata; a newest version that neither names (a manual copy) is never assumed to be
worse: a guarded push refuses to shadow it.
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
from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io, remote_fs
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
SAVED_MODEL_FILE = "saved_model.pb"  # a version directory is a version, for TF Serving, once this exists
STORES = ("s3", "gs")  # object stores a serving_model_dir may be on
# An object-store version without saved_model.pb and without a write for this long is an abandoned push.
STALE_AFTER_S = 600.0
_STORE_POLL_S = 0.5
_RAW = CompressionTypes.UNCOMPRESSED  # copy bytes as they are: FileSystems would (de)compress a `.gz` asset


class PushRefused(Exception):
    """The compare-and-set failed: the served model is not one the model to push was judged against."""

    def __init__(self, reason: str, served: Served):
        super().__init__(reason)
        self.served = served


def check_writable(directory: str) -> None:
    """Raise unless `directory` exists and accepts new entries, or could be created.

    Probes by creating and removing an entry (permission bits alone say nothing for root or on a
    read-only mount). A directory that does not exist yet is judged by its nearest existing parent;
    on an object store, by creating and removing an object under it.
    """
    if remote_fs.is_remote(directory):
        _check_store_writable(directory)
        return
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
    """Integer version directories under the model base path (TF Serving ignores everything else).

    On an object store a version directory is a prefix holding objects, complete or not.
    """
    if remote_fs.is_remote(serving_model_dir):
        return sorted(_list_store(serving_model_dir).versions)
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
    path = artifact_io.join(version_dir, PUSH_RECORD)
    try:
        if remote_fs.is_remote(path):
            if not FileSystems.exists(path):
                return None
            with FileSystems.open(path, compression_type=_RAW) as f:
                record = json.loads(f.read())
        else:
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
    """The newest version and its model, from its push record or else `known_pushes` (destination -> model URI).

    On an object store, the newest complete version (one with saved_model.pb): what a server loads.
    """
    if remote_fs.is_remote(serving_model_dir):
        return _served_in_store(serving_model_dir, _list_store(serving_model_dir), known_pushes)
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
    stale_after_s: float = STALE_AFTER_S,
) -> tuple[int, str]:
    """Copy `model_dir` to the next version under `serving_model_dir`; returns (version, destination).

    `record` (with at least `model_uri`) becomes the version's push record. With a `guard`, the newest
    version is checked before the copy and again under the lock right before the rename; when the
    guard refuses, PushRefused says why and nothing is left behind. On an object store (see the module
    docstring) `record` is required, since it claims the version, and a version left incomplete by a
    push that died is taken for abandoned after `stale_after_s` without a write.
    """
    if remote_fs.is_remote(serving_model_dir):
        return _push_to_store(
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


# -- object stores ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _StoreVersion:
    """The objects under one integer version prefix of a serving directory on an object store."""

    files: dict[str, FileMetadata]  # path relative to the version directory -> its listing entry

    @property
    def complete(self) -> bool:
        return SAVED_MODEL_FILE in self.files

    def idle_s(self) -> float:
        """Seconds since the last write to it (the store's object times against this host's clock)."""
        return time.time() - max(m.last_updated_in_seconds for m in self.files.values())


@dataclasses.dataclass
class _StoreListing:
    versions: dict[int, _StoreVersion]
    temps: dict[str, _StoreVersion]  # `.push-tmp-*` upload prefixes, by name


def _store_errors() -> tuple[type[BaseException], ...]:
    """What Beam's S3 and GCS clients raise for a failed request (neither is an OSError)."""
    errors: list[type[BaseException]] = [OSError, BeamIOError]
    with contextlib.suppress(ImportError):
        from apache_beam.io.aws.clients.s3.messages import S3ClientError

        errors.append(S3ClientError)
    with contextlib.suppress(ImportError):
        from google.api_core.exceptions import GoogleAPIError

        errors.append(GoogleAPIError)
    return tuple(errors)


def _list_tree(prefix: str) -> dict[str, FileMetadata]:
    """Relative path -> listing entry of every object under `prefix` (one listing; directory markers skipped)."""
    base = prefix.rstrip("/") + "/"
    found = {}
    for m in FileSystems.match([base + "**"])[0].metadata_list:
        relative = m.path[len(base) :]
        if relative and not relative.endswith("/"):
            found[relative] = m
    return found


def _list_store(serving_model_dir: str) -> _StoreListing:
    """The versions and push temp prefixes under a serving directory on an object store, from one listing."""
    versions: dict[int, _StoreVersion] = {}
    temps: dict[str, _StoreVersion] = {}
    for relative, m in _list_tree(serving_model_dir).items():
        top, _, rest = relative.partition("/")
        if not rest:
            continue  # an object directly under the base path is no version
        if top.isascii() and top.isdigit():
            versions.setdefault(int(top), _StoreVersion({})).files[rest] = m
        elif top.startswith(_TEMP_PREFIX):
            temps.setdefault(top, _StoreVersion({})).files[rest] = m
    return _StoreListing(versions, temps)


def _served_in_store(
    serving_model_dir: str, listing: _StoreListing, known_pushes: Mapping[str, str] | None
) -> Served | None:
    complete = [v for v, found in listing.versions.items() if found.complete]
    if not complete:
        return None
    version = max(complete)
    destination = artifact_io.join(serving_model_dir, str(version))
    record = read_push_record(destination) if PUSH_RECORD in listing.versions[version].files else None
    if record is not None:
        return Served(version, destination, record["model_uri"], record.get("pushed_by"))
    return Served(version, destination, (known_pushes or {}).get(destination))


def _check_store_writable(directory: str) -> None:
    probe = artifact_io.join(directory, f"{_TEMP_PREFIX}probe-{uuid.uuid4().hex}")
    try:
        with FileSystems.create(probe, compression_type=_RAW) as f:
            f.write(b"probe")
        FileSystems.delete([probe])
    except _store_errors() as e:
        raise PipelineDefinitionError(
            f"serving_model_dir {directory!r} is not writable ({type(e).__name__}: {e}); expected an existing "
            f"bucket this process may write to, with {remote_fs.scheme(directory)}:// credentials configured"
        ) from None


def _bucket_and_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.split("://", 1)[1].partition("/")
    return bucket, key


def _beam_options() -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions

    return FileSystems._pipeline_options or PipelineOptions([])  # what Beam's own S3/GCS clients are built from


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create the object `path` holding `data` unless one exists: True if this call created it.

    The store decides atomically (S3: PutObject with If-None-Match: *; GCS: ifGenerationMatch=0), with
    the client and credentials Beam's own filesystem for that scheme is built from.
    """
    bucket, key = _bucket_and_key(path)
    scheme = remote_fs.scheme(path)
    if scheme == "s3":
        from apache_beam.io.aws.clients.s3 import boto3_client
        from botocore.exceptions import ClientError

        try:
            boto3_client.Client(_beam_options()).client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:  # PreconditionFailed: the object exists
                return False
            if status == 409:  # ConditionalRequestConflict: a concurrent create of it is under way
                return False
            raise PipelineRunError(f"creating {path} failed: {e}") from None
        return True
    if scheme == "gs":
        from apache_beam.io.gcp import gcsio
        from google.api_core.exceptions import PreconditionFailed

        try:
            gcsio.GcsIO(pipeline_options=_beam_options()).client.bucket(bucket).blob(key).upload_from_string(
                data, if_generation_match=0
            )
        except PreconditionFailed:
            return False
        return True
    raise PipelineDefinitionError(f"{path}: no conditional create on {scheme}://; supported are {', '.join(STORES)}")


def _copy_objects(sources: list[str], destinations: list[str]) -> None:
    """Copy objects within one store (server-side on S3 and GCS); raise if any copy failed."""
    if not sources:
        return
    results = FileSystems.copy(sources, destinations)
    # Beam's S3 filesystem returns per-object errors instead of raising them (GCS raises BeamIOError).
    failed = {(src, dst): err for src, dst, err in (results or []) if err is not None}
    if failed:
        raise BeamIOError("copy failed", failed)


def _upload(files: Mapping[str, str], target: str) -> dict[str, str]:
    """Stream every file (relative path -> path on any filesystem) to under `target`; returns the new paths."""
    uploaded = {}
    for relative, source in files.items():
        destination = artifact_io.join(target, relative)
        with (
            FileSystems.open(source, compression_type=_RAW) as fin,
            FileSystems.create(destination, compression_type=_RAW) as fout,
        ):
            shutil.copyfileobj(fin, fout, 1 << 20)
        uploaded[relative] = destination
    return uploaded


def _remove_tree(prefix: str) -> None:
    """Delete every object under `prefix`, a saved_model.pb first: no version is complete while half deleted."""
    found = _list_tree(prefix)
    if SAVED_MODEL_FILE in found:
        FileSystems.delete([found.pop(SAVED_MODEL_FILE).path])
    if found:
        FileSystems.delete([m.path for m in found.values()])


def _push_to_store(
    model_dir: str,
    serving_model_dir: str,
    *,
    record: Mapping[str, Any] | None,
    guard: Guard | None,
    known_pushes: Mapping[str, str] | None,
    timeout_s: float,
    stale_after_s: float,
) -> tuple[int, str]:
    """push_model onto an object store: claim a version conditionally, copy saved_model.pb last."""
    if record is None:
        raise ValueError(
            f"push_model to {serving_model_dir}: an object-store push needs a record (it claims the version)"
        )
    base = serving_model_dir.rstrip("/")
    source = model_dir.rstrip("/")
    listed = {relative: m for relative, m in _list_tree(source).items() if relative != PUSH_RECORD}
    files = {relative: m.path for relative, m in listed.items()}
    sizes = {relative: m.size_in_bytes for relative, m in listed.items()}
    if not files:
        raise PipelineDefinitionError(f"model directory {model_dir!r} is empty or missing: nothing to push")
    if SAVED_MODEL_FILE not in files:
        raise PipelineDefinitionError(
            f"model directory {model_dir!r} has no {SAVED_MODEL_FILE}: not a SavedModel, nothing to push"
        )
    push_id = uuid.uuid4().hex
    claim = json.dumps({**record, "push_id": push_id}, indent=2, sort_keys=True).encode()
    staged = version = None
    published = False
    try:
        if guard is not None:  # early, to spare the upload; again right before the claim
            guard.check(_served_in_store(base, _list_store(base), known_pushes))
        if remote_fs.scheme(source) != remote_fs.scheme(base):
            staged = artifact_io.join(base, f"{_TEMP_PREFIX}{push_id}")
            files = _upload(files, staged)  # the slow part, before any claim: the claim is held for seconds
        version = _claim_version(base, claim, guard, known_pushes, timeout_s, stale_after_s)
        destination = artifact_io.join(base, str(version))
        _publish(files, sizes, destination, claim)
        published = True
    except _store_errors() as e:
        raise PipelineRunError(
            f"pushing {model_dir!r} to serving_model_dir {serving_model_dir!r} failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        _clean_up_failed_push(base, staged, None if published else version)
    _remove_abandoned(base, version, stale_after_s)
    return version, destination


def _claim_version(
    base: str,
    claim: bytes,
    guard: Guard | None,
    known_pushes: Mapping[str, str] | None,
    timeout_s: float,
    stale_after_s: float,
) -> int:
    """Check the guard on a fresh listing and claim the version above the newest; the store arbitrates races."""
    deadline = time.monotonic() + timeout_s
    for _ in range(_MAX_RENAME_ATTEMPTS):
        listing = _settled_listing(base, deadline, timeout_s, stale_after_s)
        if guard is not None:
            guard.check(_served_in_store(base, listing, known_pushes))
        version = max(listing.versions, default=0) + 1
        if _create_exclusive(artifact_io.join(base, str(version), PUSH_RECORD), claim):
            return version
        log.info("version %d under %s was claimed by another push meanwhile; looking again", version, base)
    raise PipelineRunError(
        f"serving_model_dir {base!r}: no version could be claimed in {_MAX_RENAME_ATTEMPTS} attempts"
    )


def _settled_listing(base: str, deadline: float, timeout_s: float, stale_after_s: float) -> _StoreListing:
    """A listing whose newest version is complete or abandoned: a push in progress is waited for, not shadowed."""
    while True:
        listing = _list_store(base)
        newest = max(listing.versions, default=0)
        pending = listing.versions.get(newest)
        if pending is None or pending.complete or pending.idle_s() >= stale_after_s:
            return listing  # an abandoned version is passed over, and removed once this push is published
        if time.monotonic() >= deadline:
            holder = read_push_record(artifact_io.join(base, str(newest))) if PUSH_RECORD in pending.files else None
            by = (holder or {}).get("pushed_by") or "a push without push record"
            raise PipelineRunError(
                f"serving_model_dir {base!r}: waited {timeout_s:g} s for the push of version {newest} (by {by}) "
                f"to write its {SAVED_MODEL_FILE}; if that push hangs, stop it; if it died, its version counts "
                f"as abandoned {stale_after_s:g} s after its last write"
            )
        time.sleep(_STORE_POLL_S)


def _publish(files: Mapping[str, str], sizes: Mapping[str, int], destination: str, claim: bytes) -> None:
    """Copy every object but saved_model.pb, check they and the claim are all there, then copy saved_model.pb.

    Other pushes take a version for abandoned STALE_AFTER_S after its last write, so saved_model.pb is
    written only within half that: never into a version another push may be deleting.
    """
    others = sorted(relative for relative in files if relative != SAVED_MODEL_FILE)
    _copy_objects([files[r] for r in others], [artifact_io.join(destination, r) for r in others])
    last_write = time.monotonic()
    present = _list_tree(destination)
    missing = sorted(r for r in others if r not in present or present[r].size_in_bytes != sizes[r])
    if missing or artifact_io.read_bytes(artifact_io.join(destination, PUSH_RECORD)) != claim:
        raise PipelineRunError(
            f"{destination} changed while it was being pushed (missing or changed: {missing or [PUSH_RECORD]}): "
            f"another push took it for abandoned; nothing was published, push again"
        )
    if time.monotonic() - last_write > STALE_AFTER_S / 2:
        raise PipelineRunError(
            f"{destination}: the push stalled for over {STALE_AFTER_S / 2:g} s before its {SAVED_MODEL_FILE}, so "
            "another push may have taken it for abandoned; nothing was published, push again"
        )
    _copy_objects([files[SAVED_MODEL_FILE]], [artifact_io.join(destination, SAVED_MODEL_FILE)])


def _clean_up_failed_push(base: str, staged: str | None, claimed: int | None) -> None:
    """Remove a push's upload prefix and, if it did not publish, its claimed version (never a published one)."""
    for prefix in [staged, None if claimed is None else artifact_io.join(base, str(claimed))]:
        if prefix is None:
            continue
        try:
            _remove_tree(prefix)
        except _store_errors() as e:  # the push's own outcome stands; an incomplete version is never served
            log.warning("could not remove %s after the push (%s); the next push removes it once stale", prefix, e)


def _remove_abandoned(base: str, below: int, stale_after_s: float) -> None:
    """Delete versions below `below` that never got their saved_model.pb, and upload prefixes, idle past staleness."""
    try:
        listing = _list_store(base)
        abandoned = [found for v, found in listing.versions.items() if v < below and not found.complete]
        abandoned += listing.temps.values()
        doomed = [m.path for found in abandoned if found.idle_s() >= stale_after_s for m in found.files.values()]
        if doomed:
            FileSystems.delete(doomed)
            log.info("removed %d objects of abandoned pushes under %s", len(doomed), base)
    except _store_errors() as e:  # this push is published either way
        log.warning("could not remove abandoned pushes under %s (%s); the next push tries again", base, e)


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
            versions = _list_store(directory).versions
            return json.dumps(
                [
                    [v, sorted((relative, m.size_in_bytes) for relative, m in found.files.items())]
                    for v, found in sorted(versions.items())
                    if found.complete
                ]
            )
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
