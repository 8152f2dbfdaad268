"""Push a model onto an object store (s3://, gs://): no rename and no locks, so a conditional create claims the version.

Both stores create an object only if none exists, atomically (S3: PutObject with `If-None-Match: *`;
GCS: `ifGenerationMatch=0`). A model not already on the same store is first uploaded under a hidden
`.push-tmp-<id>/` prefix. Then the version number is claimed by creating
`<version>/assets.extra/push_record.json` conditionally: of two pushes that chose the same number,
exactly one gets it; the other lists again and re-checks. The claim is made right after the
compare-and-set check (transforms/_push_record.py) on a fresh listing, and a version whose claim
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
import uuid
from collections.abc import Mapping
from typing import Any

from apache_beam.io.filesystem import BeamIOError, FileMetadata
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io, remote_fs
from beam_pipeline.errors import PipelineDefinitionError, PipelineRunError
from transforms._push_record import (
    MAX_VERSION_ATTEMPTS,
    PUSH_RECORD,
    RAW,
    SAVED_MODEL_FILE,
    TEMP_PREFIX,
    Guard,
    Served,
    read_push_record,
)

log = logging.getLogger(__name__)

STORES = ("s3", "gs")  # object stores a serving_model_dir may be on
# A version without saved_model.pb and without a write for this long is an abandoned push.
STALE_AFTER_S = 600.0
_STORE_POLL_S = 0.5


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
        elif top.startswith(TEMP_PREFIX):
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
    return Served.of(version, destination, record, known_pushes)


def versions(serving_model_dir: str) -> list[int]:
    """The integer version prefixes holding objects, complete or not."""
    return sorted(_list_store(serving_model_dir).versions)


def served(serving_model_dir: str, known_pushes: Mapping[str, str] | None = None) -> Served | None:
    """The newest complete version (one with saved_model.pb): what a server loads."""
    return _served_in_store(serving_model_dir, _list_store(serving_model_dir), known_pushes)


def fingerprint(serving_model_dir: str) -> str:
    """Complete versions and their objects' sizes, from one listing: nothing downloaded, no push in progress."""
    return json.dumps(
        [
            [v, sorted((relative, m.size_in_bytes) for relative, m in found.files.items())]
            for v, found in sorted(_list_store(serving_model_dir).versions.items())
            if found.complete
        ]
    )


def check_writable(directory: str) -> None:
    """Raise unless an object can be created and removed under `directory`."""
    probe = artifact_io.join(directory, f"{TEMP_PREFIX}probe-{uuid.uuid4().hex}")
    try:
        with FileSystems.create(probe, compression_type=RAW) as f:
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
            FileSystems.open(source, compression_type=RAW) as fin,
            FileSystems.create(destination, compression_type=RAW) as fout,
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


def push(
    model_dir: str,
    serving_model_dir: str,
    *,
    record: Mapping[str, Any] | None,
    guard: Guard | None,
    known_pushes: Mapping[str, str] | None,
    timeout_s: float,
    stale_after_s: float,
) -> tuple[int, str]:
    """push_model onto an object store: claim a version conditionally with `record`, copy saved_model.pb last."""
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
            staged = artifact_io.join(base, f"{TEMP_PREFIX}{push_id}")
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
    for _ in range(MAX_VERSION_ATTEMPTS):
        listing = _settled_listing(base, deadline, timeout_s, stale_after_s)
        if guard is not None:
            guard.check(_served_in_store(base, listing, known_pushes))
        version = max(listing.versions, default=0) + 1
        if _create_exclusive(artifact_io.join(base, str(version), PUSH_RECORD), claim):
            return version
        log.info("version %d under %s was claimed by another push meanwhile; looking again", version, base)
    raise PipelineRunError(
        f"serving_model_dir {base!r}: no version could be claimed in {MAX_VERSION_ATTEMPTS} attempts"
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
