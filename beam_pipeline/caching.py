"""Cache keys: a component is reused only when everything that decides its outputs is unchanged."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.artifacts import Artifact
from beam_pipeline.dsl import Component


def file_fingerprint(path: str) -> str:
    """Hash of a file's bytes (content, not mtime: touching a file does not invalidate the cache)."""
    h = hashlib.blake2b(digest_size=16)
    with FileSystems.open(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(component: Component, inputs: Mapping[str, Sequence[Artifact]]) -> str:
    """Key from type + implementation version, configuration, user module contents and input fingerprints."""
    payload = {
        "type": f"{type(component).__module__}.{type(component).__qualname__}",
        "version": component.VERSION,
        "config": component.exec_properties(),
        "modules": {m: file_fingerprint(m) for m in component.module_files()},
        "external": component.external_fingerprint(inputs),
        "inputs": {name: [a.properties.get("fingerprint") for a in arts] for name, arts in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
