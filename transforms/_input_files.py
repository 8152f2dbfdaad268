"""Finding and opening ExampleGen's input files: glob listing that names what is wrong, decompression, CSV headers."""

from __future__ import annotations

import errno
import io
import os
import socket
from collections.abc import Sequence
from typing import BinaryIO

import pyarrow.csv as pv
from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.errors import InputDataError

SAMPLE_BYTES = 1 << 18


def match_files(patterns: Sequence[str]) -> list[str]:
    """Expand globs; a pattern matching nothing is an error that names it, and so is one that cannot be listed."""
    return [m.path for m in match_metadata(patterns)]


def match_metadata(patterns: Sequence[str]) -> list[FileMetadata]:
    """Listing metadata (path, size) of every file the globs match, by path; errors as `match_files`."""
    files: dict[str, FileMetadata] = {}
    for pattern in patterns:
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except BeamIOError as e:
            causes = list((e.exception_details or {}).values())
            if not causes or not all(_is_not_found(c) for c in causes):
                detail = "; ".join(f"{type(c).__name__}: {c}" for c in causes) or str(e)
                raise InputDataError(
                    f"input path {pattern!r} cannot be listed ({detail}): check the filesystem's "
                    "credentials and permissions for it"
                ) from e
            found = []
        found = [m for m in found if m.size_in_bytes is not None]
        if not found:
            raise InputDataError(f"input path {pattern!r} matches no file: check the path or glob pattern")
        files.update((m.path, m) for m in found)
    return [files[path] for path in sorted(files)]


def _is_not_found(exc: BaseException) -> bool:
    return (
        isinstance(exc, FileNotFoundError)
        or getattr(exc, "errno", None) == errno.ENOENT
        or getattr(exc, "code", None) == 404  # object stores' NotFound
    )


def is_compressed(path: str) -> bool:
    """True when the suffix names a compression Beam's FileSystems decode (.gz, .bz2, .zst, .xz, .deflate)."""
    return CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED


def open_data(path: str) -> BinaryIO:
    """A file's data: decompressed when its suffix names a compression."""
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO)


def file_size(path: str) -> int:
    """Size in bytes of the file as stored (compressed, if it is)."""
    found = FileSystems.match([path])[0].metadata_list
    if not found:
        raise InputDataError(
            f"input file {path} is not visible on {socket.gethostname()} (pid {os.getpid()}), where this part of "
            "the job runs: on a cluster the input must be on a filesystem every worker reaches (s3://, gs://), "
            "not the driver's local disk"
        )
    return found[0].size_in_bytes


def read_range(path: str, start: int, length: int) -> bytes:
    """Up to `length` bytes of a file's (decompressed) data from `start`."""
    with open_data(path) as f:
        f.seek(start)
        return f.read(length)


def csv_header(path: str) -> list[str]:
    """Column names from the first line; empty files and header-only files are errors."""
    head = read_range(path, 0, SAMPLE_BYTES)
    if not head:
        raise InputDataError(f"{path}: file is empty; expected a CSV header line followed by rows")
    first, _sep, rest = head.partition(b"\n")
    names = pv.read_csv(io.BytesIO(first + b"\n"), read_options=pv.ReadOptions(use_threads=False)).column_names
    if not rest.strip():
        raise InputDataError(f"{path}: has a header line but no data rows")
    return names
