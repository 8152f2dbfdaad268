"""Stage user module files under the pipeline root, content-addressed, as they were at launch.

Workers load the staged copy (they may not see the driver's disk), the cache key hashes the same
bytes, and `diff` shows the code each model was actually built from, even after the file changed.
"""

from __future__ import annotations

import hashlib
import posixpath

from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io
from beam_pipeline.dsl import Component
from beam_pipeline.errors import UserModuleError

STAGING_DIR = "_staged"


def module_params(component: Component) -> dict[str, str]:
    """The component's user-module parameters (`module_file`, `*_module_file`) that are set."""
    return {k: v for k, v in component.params.items() if k.endswith("module_file") and isinstance(v, str) and v}


def stage(pipeline_root: str, path: str) -> str:
    """Copy `path` to `<root>/_staged/<sha256 of its bytes>/<its name>` unless already there; that URI."""
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            content = f.read()
    except OSError as e:
        raise UserModuleError(f"user module file {path} cannot be read: {e}") from None
    digest = hashlib.sha256(content).hexdigest()[:32]
    target = artifact_io.join(pipeline_root, STAGING_DIR, digest, posixpath.basename(path.replace("\\", "/")))
    if not FileSystems.exists(target):
        artifact_io.write_bytes_atomic(target, content)  # whole or absent: a worker may read it at once
    return target


def stage_modules(pipeline_root: str, component: Component) -> dict[str, str]:
    """Stage each of the component's module files; parameter name -> staged URI."""
    return {name: stage(pipeline_root, path) for name, path in module_params(component).items()}
