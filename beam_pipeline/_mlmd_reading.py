"""Opening an ML Metadata store and the small readers every query shares: properties, states, configs, artifacts."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import remote_fs
from beam_pipeline.artifacts import Artifact
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import ABANDONED, ABANDONED_PREFIX, STATE_NAMES, MetadataStore


# -- opening -----------------------------------------------------------------------------------------
def open_store(store: MetadataStore | str) -> MetadataStore:
    """A store from a URI, refusing to create an empty SQLite file where the user mistyped a path."""
    if isinstance(store, MetadataStore):
        return store
    if not store.startswith("mysql://"):
        path = store[len("sqlite://") :] if store.startswith("sqlite://") else store
        if "://" not in path and not os.path.isfile(path):  # a remote path: MetadataStore says what to pass
            raise MetadataError(f"no ML Metadata store at {path}: run a pipeline first, or pass --metadata-uri")
    return MetadataStore(store)


def store_uri(metadata_uri: str | None, pipeline_root: str | None) -> str:
    """The store a command means: an explicit URI, else `<pipeline root>/metadata.sqlite`."""
    if metadata_uri:
        return metadata_uri
    if pipeline_root and remote_fs.is_remote(pipeline_root):
        raise MetadataError(
            f"pipeline root {pipeline_root} is on {remote_fs.scheme(pipeline_root)}://, where no SQLite store can "
            "live: pass --metadata-uri (or BEAM_PIPELINE_METADATA_URI), the local SQLite path or mysql://... URI "
            "the run recorded into"
        )
    if pipeline_root:
        return os.path.join(os.path.abspath(pipeline_root), "metadata.sqlite")
    raise MetadataError(
        "say which ML Metadata store to read: --metadata-uri (or BEAM_PIPELINE_METADATA_URI) or --pipeline-root"
    )


# -- small readers -----------------------------------------------------------------------------------
def prop_value(e: mlmd_pb2.Execution | mlmd_pb2.Artifact, name: str) -> Any:
    """A (custom) property of an MLMD record as a plain Python value, None if unset."""
    for props in (e.properties, e.custom_properties):
        if name in props:
            v = props[name]
            kind = v.WhichOneof("value")
            return getattr(v, kind) if kind else None
    return None


def state_name(e: mlmd_pb2.Execution) -> str:
    """The execution's state; ABANDONED for one whose launcher died before it finished."""
    error = prop_value(e, "error")
    if e.last_known_state == mlmd_pb2.Execution.FAILED and str(error or "").startswith(ABANDONED_PREFIX):
        return ABANDONED
    return STATE_NAMES.get(e.last_known_state, "UNKNOWN")


def execution_config(e: mlmd_pb2.Execution) -> dict[str, Any]:
    raw = prop_value(e, "config")
    return json.loads(raw) if raw else {}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys (`splits.train`), so each setting is one column."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def get_artifact(store: MetadataStore, artifact_id: int, type_name: str | None = None) -> Artifact:
    """One artifact by id, checked to be of `type_name` when given."""
    found = store.get_artifacts([artifact_id])
    if not found:
        raise MetadataError(f"no artifact with id {artifact_id} in {store.uri}")
    artifact = found[0]
    if type_name and artifact.type.name != type_name:
        raise MetadataError(f"artifact {artifact_id} is of type {artifact.type.name}, not {type_name}")
    return artifact


def _outputs_of(store: MetadataStore, execution_id: int) -> dict[str, Artifact]:
    return store.execution_artifacts(execution_id)[1]
