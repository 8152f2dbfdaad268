"""Content fingerprints of files that read no unchanged byte: the store's checksums remotely, a stat-keyed memo locally.

On an object store (`remote_fs.is_remote`) a file's fingerprint is its size and the checksum the
store keeps for it (`FileSystems.checksum`: S3's ETag, GCS's CRC32C, HDFS's MD5-of-CRC), all derived
from the content, so a re-upload of the same bytes keeps the fingerprint and nothing is downloaded.

On local disk content decides (a touched file keeps its fingerprint), but a file is hashed once per
change: its blake2b digest is memoized under its stat identity (device, inode, size, mtime_ns,
ctime_ns). No user can set ctime, so the content cannot change without the identity changing. The
memo lives in the user's cache directory (`BEAM_PIPELINE_CACHE_DIR`, else `$XDG_CACHE_HOME/beam-pipeline`,
else `~/.cache/beam-pipeline`), not under a pipeline root: a stat identity means something only on
the machine that took it (a root on an object store is shared between machines), one input file
serves many pipelines, and a component plans before it knows its pipeline's root. Entries are small
JSON files written under a temporary name and renamed, so concurrent launchers never read a part of
one; losing the directory costs one re-hash, never a wrong answer. The same memo keeps the CSV type
scan's result (see `recall` / `remember`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from apache_beam.io.filesystem import BeamIOError, FileMetadata
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import remote_fs

CACHE_DIR_ENV = "BEAM_PIPELINE_CACHE_DIR"
FILE_DIGESTS = "file-digests"
_CHECKSUM_THREADS = 16  # a checksum is one metadata request: latency-bound, so many at once
_CHUNK = 1 << 20
log = logging.getLogger(__name__)


# -- the memo --------------------------------------------------------------------------------------
def cache_dir() -> str:
    """This user's cache directory for fingerprints and type scans (see the module docstring)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "beam-pipeline")


def _entry_path(kind: str, name: str) -> str:
    return FileSystems.join(cache_dir(), kind, hashlib.sha256(name.encode()).hexdigest()[:40] + ".json")


def recall(kind: str, name: str, valid_for: str) -> Any | None:
    """The value remembered for `name` while it was `valid_for`, else None (never remembered, or stale)."""
    path = _entry_path(kind, name)
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            entry = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:  # only a foreign hand can leave a part of an entry (ours are renamed into place)
        log.warning("ignoring unreadable cache entry %s (it is rewritten on the next miss)", path)
        return None
    if not isinstance(entry, dict) or entry.get("name") != name or entry.get("valid_for") != valid_for:
        return None
    return entry.get("value")


def remember(kind: str, name: str, valid_for: str, value: Any) -> None:
    """Record `value` for `name` while it is `valid_for`: one entry per name, replaced whole (atomic rename)."""
    path = _entry_path(kind, name)
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with FileSystems.create(temp) as f:
            f.write(json.dumps({"name": name, "valid_for": valid_for, "value": value}).encode())
        FileSystems.rename([temp], [path])  # os.rename: a reader sees the old entry or the new, never a part
    except (OSError, BeamIOError) as e:  # the value is still right; only the next run pays again
        log.warning("cannot write the cache entry %s (%s): set %s to a writable directory", path, e, CACHE_DIR_ENV)


# -- input files -----------------------------------------------------------------------------------
def file_fingerprints(files: Sequence[FileMetadata | str]) -> dict[str, str]:
    """Path -> content fingerprint of each file, reading no byte of a file that did not change.

    Give `FileSystems.match` metadata where you have it: a remote file then costs one checksum request.
    """
    out: dict[str, str] = {}
    remote: list[FileMetadata | str] = []
    for f in files:
        path = f if isinstance(f, str) else f.path
        if remote_fs.is_remote(path):
            remote.append(f)
        else:
            out[path] = local_digest(path)
    out.update(_store_fingerprints(remote))
    return out


def file_fingerprint(path: str) -> str:
    """The content fingerprint of one file (see `file_fingerprints`)."""
    return file_fingerprints([path])[path]


def _store_fingerprints(files: Sequence[FileMetadata | str]) -> dict[str, str]:
    paths = [f if isinstance(f, str) else f.path for f in files]
    sizes = {f.path: f.size_in_bytes for f in files if not isinstance(f, str)}
    for path in paths:
        if path not in sizes:
            found = [m for m in FileSystems.match([path])[0].metadata_list if m.path == path]
            if not found:
                raise FileNotFoundError(f"{path}: no such file on the store (its fingerprint needs its size)")
            sizes[path] = found[0].size_in_bytes
    return {path: f"{sizes[path]}:{checksum}" for path, checksum in store_checksums(paths).items()}


def store_checksums(paths: Sequence[str]) -> dict[str, str]:
    """Path -> the checksum an object store keeps for the file (`FileSystems.checksum`), fetched in parallel.

    A store that keeps none for a file gets its bytes hashed instead: slow, but content still decides.
    """
    if not paths:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(_CHECKSUM_THREADS, len(paths))) as pool:
        checksums = dict(zip(paths, pool.map(_checksum, paths), strict=True))
    return checksums


def _checksum(path: str) -> str:
    try:
        checksum = FileSystems.checksum(path)
    except BeamIOError as e:
        causes = "; ".join(f"{type(c).__name__}: {c}" for c in (e.exception_details or {}).values()) or str(e)
        raise OSError(
            f"{path}: cannot read the store's checksum ({causes}): check the credentials and permissions for it"
        ) from e
    if checksum:
        return str(checksum)
    log.warning("%s: the store keeps no checksum for it; hashing its bytes", path)
    return "blake2b:" + _hash_bytes(path)


# -- local files -----------------------------------------------------------------------------------
def local_digest(path: str) -> str:
    """blake2b-128 of a local file's bytes, hashed only when its stat identity changed since it last was.

    os.stat, not FileSystems: the identity (inode, ctime) exists only for a local path, which this is.
    """
    local = path[len("file://") :] if path.startswith("file://") else path
    name = os.path.abspath(local)
    st = os.stat(local)
    hit = recall(FILE_DIGESTS, name, _identity(st))
    if isinstance(hit, str):
        return hit
    wait_ns = _unsettled_ns(st)
    if wait_ns > 0:  # written moments ago: wait until a further write must get a later timestamp
        time.sleep(wait_ns / 1e9)
        st = os.stat(local)
    settled = _unsettled_ns(st) <= 0
    digest = _hash_bytes(path)
    if settled and _identity(os.stat(local)) == _identity(st):  # unchanged while it was read
        remember(FILE_DIGESTS, name, _identity(st), digest)
    return digest


def _identity(st: os.stat_result) -> str:
    return json.dumps([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])


def _unsettled_ns(st: os.stat_result) -> int:
    """How long until a write to the file must get a timestamp later than the ones `st` shows.

    The kernel stamps a write with a coarse clock (one tick, a few ms), so a second write in the
    same tick keeps ctime: a digest taken within that tick could be recorded under an identity
    the next write shares. Past the tick that cannot happen. Whole-second timestamps mean a
    filesystem that stamps in seconds (FAT: two), so there the tick is two seconds. Assumes the
    filesystem's clock is this machine's, as for a local disk.
    """
    whole_seconds = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    tick_ns = 2_000_000_000 if whole_seconds else 20_000_000
    return max(st.st_mtime_ns, st.st_ctime_ns) + tick_ns - time.time_ns()


def _hash_bytes(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with FileSystems.open(path, compression_type="uncompressed") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
