"""Small helpers the tests share: run a list of components as a pipeline, read ML Metadata back."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import Pipeline, launcher
from beam_pipeline.metadata import MetadataStore


def in_process_pipeline():
    """A bare Beam pipeline on the runner the launcher uses by default (never DirectRunner's Prism attempt)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from runners.options import in_process_runner

    options = PipelineOptions()
    return beam.Pipeline(runner=in_process_runner(options), options=options)


def run_components(root, components, name="test", beam_args=(), **kwargs):
    pipeline = Pipeline(name, str(root), components)
    return launcher.run(pipeline, list(beam_args), **kwargs)


def store_at(root) -> MetadataStore:
    return MetadataStore(os.path.join(str(root), "metadata.sqlite"))


def executions_by_state(store: MetadataStore) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in store.mlmd.get_executions():
        state = mlmd_pb2.Execution.State.Name(e.last_known_state)
        out.setdefault(state, []).append(e.properties["component_id"].string_value)
    return out


def in_ci() -> bool:
    """True when the environment says CI=true (as CI services set it): missing system tools then fail."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require(available: object, reason: str) -> None:
    """Skip the running test when a system dependency is missing (Chromium, MariaDB...), but fail it in CI,
    where `.ci/run` was meant to install it: a suite must not pass there by skipping what it could not run."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so a missing system dependency is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


def needs(available: object, reason: str) -> Callable[[Any], Any]:
    """`require` as a decorator, decided at collection so no fixture is built for a test that cannot run."""

    def decorate(test: Any) -> Any:
        if available:
            return test
        if not in_ci():
            return pytest.mark.skip(reason=reason)(test)

        def missing_dependency() -> None:
            require(available, reason)

        for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(missing_dependency, attribute, getattr(test, attribute))
        missing_dependency.pytestmark = [m for m in getattr(test, "pytestmark", []) if m.name != "parametrize"]
        return missing_dependency

    return decorate


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def _set_immutable(path: str, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        flags[0] = flags[0] | _FS_IMMUTABLE_FL if on else flags[0] & ~_FS_IMMUTABLE_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags)
    finally:
        os.close(fd)


def _refuses_entries(path: str) -> bool:
    probe = os.path.join(path, ".probe")
    try:
        os.mkdir(probe)
    except OSError as e:
        return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    os.rmdir(probe)
    return False


@contextlib.contextmanager
def read_only_directory(path: str) -> Iterator[str]:
    """Make the existing, empty directory `path` refuse new entries for the block, even to root.

    Mode 0555 is enough for other users; root ignores it, so then the directory is made immutable
    (the `chattr +i` ioctl) or, where the filesystem has no such flag, a read-only tmpfs is mounted on it.
    """
    os.chmod(path, 0o555)
    undo: list[Callable[[], None]] = [lambda: os.chmod(path, 0o755)]
    try:
        if not _refuses_entries(path):
            with contextlib.suppress(OSError):
                _set_immutable(path, True)
                undo.append(lambda: _set_immutable(path, False))
        if not _refuses_entries(path):
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", path], capture_output=True)
            if mounted.returncode == 0:
                undo.append(lambda: subprocess.run(["umount", path], check=True))
        if not _refuses_entries(path):
            raise RuntimeError(f"could not make {path} read-only for uid {os.geteuid()}: no chmod, chattr or mount")
        yield path
    finally:
        for step in reversed(undo):
            step()
