"""Cache keys: a component is reused only when everything that decides its outputs is unchanged.

The key is one pure function of what the launcher hands it: the component's type and VERSION, its
configuration, the contents of the files it loads (module files, a curated schema), what it reads
from outside the graph (input files, the serving directory), the fingerprints of its input artifacts
and of the artifacts resolved for it from ML Metadata (a baseline model, a warm-start model, the
previous run's statistics), and the versions of the libraries that compute its outputs. Nothing is
read from state memoized on the component instance.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from typing import Any

from beam_pipeline import fingerprints
from beam_pipeline.artifacts import Artifact
from beam_pipeline.dsl import Component

# The libraries whose upgrade can change an output: statistics, schemas, transforms, models, metrics.
_LIBRARIES = (
    "apache-beam",
    "tensorflow",
    "tf-keras",
    "tensorflow-transform",
    "tensorflow-data-validation",
    "tensorflow-model-analysis",
    "tfx-bsl",
    "pyarrow",
    "beam-pipeline",
)


@functools.cache
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that compute outputs; part of every key."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def artifact_fingerprint(artifact: Artifact) -> str:
    """What identifies an artifact's content: its committed fingerprint, else where it lives."""
    fingerprint = artifact.properties.get("fingerprint")
    return str(fingerprint) if fingerprint else f"uri:{artifact.uri}"


def resolved_fingerprints(resolved: Mapping[str, Any], inputs: Mapping[str, Sequence[Artifact]]) -> dict[str, str]:
    """Fingerprints of the resolved artifacts, leaving out those that are one of the inputs.

    Resolved values that are not artifacts are hints (see `Component.resolve`) and do not count.

    A resolved artifact that is also an input (a cached model that is its own baseline, the previous
    run's statistics that are this run's) adds nothing the inputs do not already say, and counts as
    none resolved, so an unchanged pipeline stays fully cached.
    """
    own = {artifact_fingerprint(a) for arts in inputs.values() for a in arts}
    out: dict[str, str] = {}
    for name, value in sorted(resolved.items()):
        if isinstance(value, Artifact):
            fingerprint = artifact_fingerprint(value)
            if fingerprint not in own:
                out[name] = fingerprint
    return out


def cache_key(
    component: Component,
    inputs: Mapping[str, Sequence[Artifact]],
    *,
    resolved: Mapping[str, Any] | None = None,
    external: str | None = None,
    modules: Mapping[str, str] | None = None,
) -> str:
    """The key of one execution of `component` on `inputs`.

    `resolved` is what `component.resolve()` returned for this run; `external` and `modules` are
    the component's external fingerprint and module-file digests when the launcher already
    computed them for this run (they are computed here otherwise).
    """
    if external is None:
        external = component.external_fingerprint(inputs)
    if modules is None:
        modules = module_digests(component)
    payload = {
        "type": f"{type(component).__module__}.{type(component).__qualname__}",
        "version": component.VERSION,
        "config": component.cache_config(),
        "modules": dict(modules),
        "external": external,
        "inputs": {name: [artifact_fingerprint(a) for a in arts] for name, arts in sorted(inputs.items())},
        "resolved": resolved_fingerprints(resolved or {}, inputs),
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def module_digests(component: Component) -> dict[str, str]:
    """Content digest of each file the component loads, by path."""
    return {m: fingerprints.file_fingerprint(m) for m in component.module_files()}
