"""PushModel: copy SavedModels into a TF Serving model base path as new integer versions, in any Beam pipeline.

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
from beam_pipeline.errors import PipelineDefinitionError, PipelineRunError
from transforms import _push_store
from transforms._push_record import (
    MAX_VERSION_ATTEMPTS,
    PUSH_RECORD,
    TEMP_PREFIX,
    Guard,
    Served,
    read_push_record,
)
from transforms._push_store import STALE_AFTER_S

LOCK_FILE = ".push.lock"
LOCK_TIMEOUT_S = 600.0  # the lock covers a check and a rename, never a copy: waiting this long means a hung holder
_LOCK_POLL_S = 0.05


def check_destination(serving_model_dir: str, who: str) -> None:
    """Raise unless `serving_model_dir` is given and on a filesystem a push can be atomic on."""
    if not serving_model_dir:
        raise PipelineDefinitionError(f"{who} needs serving_model_dir, the model base path TF Serving watches")
    if "://" in serving_model_dir and remote_fs.scheme(serving_model_dir) not in _push_store.STORES:
        raise PipelineDefinitionError(
            f"serving_model_dir {serving_model_dir!r}: supported are local directories and "
            f"{', '.join(s + '://' for s in _push_store.STORES)} (a push needs an atomic rename or a "
            "conditional create)"
        )


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


class PushModel(beam.PTransform):
    """Push each SavedModel directory in the input to `serving_model_dir` as its next version.

    Usable in any Beam pipeline; the Pusher component adds the blessing and the guard. Example::

        pushed = models | PushModel("gs://bucket/serving/taxi")
        # elements: {"model_dir": ..., "pushed_version": 3, "pushed_destination": ".../taxi/3"}

    `serving_model_dir` is a local directory (copied aside, then renamed into place under a lock)
    or an object store path (`s3://`, `gs://`; see `_push_store`). Each version gets a push record
    naming the model directory in `assets.extra/push_record.json`. Pushes of several models, in
    one pipeline or many, take distinct versions.
    """

    def __init__(self, serving_model_dir: str, *, pushed_by: str = "PushModel"):
        super().__init__()
        check_destination(serving_model_dir, "PushModel")
        self._serving_model_dir, self._pushed_by = serving_model_dir, pushed_by

    def expand(self, model_dirs: beam.PCollection) -> beam.PCollection:
        return model_dirs | "Push" >> beam.Map(_push_one, self._serving_model_dir, self._pushed_by)


def _push_one(model_dir: str, serving_model_dir: str, pushed_by: str) -> dict[str, Any]:
    version, destination = push_model(
        model_dir, serving_model_dir, record={"model_uri": model_dir, "pushed_by": pushed_by}
    )
    return {"model_dir": model_dir, "pushed_version": version, "pushed_destination": destination}
