"""Pusher: copy a blessed model into a TF Serving model base path as a new integer version.

Layout: `serving_model_dir/<version>/` holds the SavedModel (the Model artifact's `Format-Serving`
directory). Versions are max(existing integer versions) + 1, starting at 1: small, strictly
increasing while old versions are kept, and never in the future (a timestamp version would make a
clock jump or a manual push shadow later ones). The copy goes to a hidden temp directory next to the
versions, and is renamed into place, so a model server polling the base path never sees a partial
version; if another push takes the same number first, the next free number is used.

Only the local filesystem is supported as destination: atomic directory rename is what makes the
push safe, and object stores have none.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import MODEL, MODEL_BLESSING, PUSHED_MODEL, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineDefinitionError

log = logging.getLogger(__name__)

SERVING_MODEL_DIR = "Format-Serving"
RESULT_FILE = "push_result.json"
_TEMP_PREFIX = ".push-tmp-"
_MAX_RENAME_ATTEMPTS = 100


def check_writable(directory: str) -> None:
    """Raise unless `directory` exists and accepts new entries, or could be created.

    Probes by creating and removing an entry (permission bits alone say nothing for root or on a
    read-only mount). A directory that does not exist yet is judged by its nearest existing parent.
    """
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
    """Integer version directories under the model base path (TF Serving ignores everything else)."""
    if not os.path.isdir(serving_model_dir):
        return []
    return sorted(int(n) for n in os.listdir(serving_model_dir) if n.isdigit())


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


def push_model(model_dir: str, serving_model_dir: str) -> tuple[int, str]:
    """Copy `model_dir` to the next version under `serving_model_dir`; returns (version, destination)."""
    check_writable(serving_model_dir)
    os.makedirs(serving_model_dir, exist_ok=True)
    temp = os.path.join(serving_model_dir, f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        _copy_tree(model_dir, temp)
        for _ in range(_MAX_RENAME_ATTEMPTS):
            version = max(existing_versions(serving_model_dir), default=0) + 1
            destination = os.path.join(serving_model_dir, str(version))
            try:
                # Fails when a racing push took this number (its directory is not empty); no reserving
                # mkdir, which would show the server an empty version directory.
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


class _Push:
    """Runs once, after the blessing and the model are committed: push or explain why not."""

    def __init__(self, serving_model_dir: str, result_uri: str, previous_push: dict[str, Any] | None):
        self.serving_model_dir = serving_model_dir
        self.result_uri = result_uri
        self.previous_push = previous_push

    def _already_serving(self, model: Artifact) -> bool:
        """True when this model's last push is still the newest version (a rerun with a cached model)."""
        previous = self.previous_push
        return (
            previous is not None
            and previous.get("model_uri") == model.uri
            and previous.get("pushed_version") == max(existing_versions(self.serving_model_dir), default=None)
            and os.path.isdir(str(previous.get("pushed_destination")))
        )

    def __call__(self, blessing: Artifact, model: Artifact) -> dict[str, Any]:
        blessed_model = blessing.properties.get("model_uri")
        if blessed_model is not None and blessed_model != model.uri:
            raise PipelineDefinitionError(
                f"the blessing {blessing.uri} is for model {blessed_model!r}, not for {model.uri!r}: "
                "wire the Pusher to the same model as the Evaluator"
            )
        if int(blessing.properties.get("blessed", 0)) != 1:
            why = blessing.properties.get("blessing_message") or "the blessing says blessed=0"
            message = f"model {model.uri} is not blessed; nothing pushed to {self.serving_model_dir} ({why})"
            log.warning("%s", message)
            properties: dict[str, Any] = {"pushed": 0, "push_message": message}
        else:
            if self._already_serving(model):
                version, destination = self.previous_push["pushed_version"], self.previous_push["pushed_destination"]
                message = f"model {model.uri} is already version {version} at {destination}; not copied again"
            else:
                source = artifact_io.join(model.uri, SERVING_MODEL_DIR)
                version, destination = push_model(source, self.serving_model_dir)
                message = f"pushed model {model.uri} as version {version} to {destination}"
            log.info("%s", message)
            properties = {
                "pushed": 1,
                "pushed_destination": destination,
                "pushed_version": version,
                "push_message": message,
            }
        properties["model_uri"] = model.uri
        record = {**properties, "blessing_uri": blessing.uri}
        text = json.dumps(record, indent=2, sort_keys=True)
        artifact_io.write_text(artifact_io.join(self.result_uri, RESULT_FILE), text)
        return properties


class Pusher(Component):
    """Push the model to `serving_model_dir/<version>/` when its blessing says blessed=1.

    Output `pushed_model`: properties pushed (0/1), pushed_destination, pushed_version and
    push_message, and `push_result.json` with the same facts. A model that is not blessed is not
    pushed (pushed=0, with the Evaluator's reason). Runs on every pipeline run: whether a push is
    needed depends on the serving directory, not only on the inputs.
    """

    INPUTS = {"model": InputSpec(MODEL), "blessing": InputSpec(MODEL_BLESSING)}
    OUTPUTS = {"pushed_model": PUSHED_MODEL}

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
        if "://" in serving_model_dir:
            raise PipelineDefinitionError(
                f"serving_model_dir {serving_model_dir!r}: only local directories are supported "
                "(the push is an atomic directory rename)"
            )
        super().__init__(
            inputs={"model": model, "blessing": blessing},
            params={"serving_model_dir": os.path.abspath(serving_model_dir)},
            component_id=component_id,
        )

    def external_fingerprint(self, inputs=None) -> str:
        """The versions now in serving_model_dir: if someone removed or added one, push again."""
        directory = self.params["serving_model_dir"]
        versions = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        return json.dumps([v for v in versions if v.isdigit()])

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """This Pusher's last push, so that a rerun with the same (cached) model does not push it again."""
        pushes = store.latest_artifacts(PUSHED_MODEL.name, pipeline_name, {"pushed": 1, "producer_component": self.id})
        if not pushes:
            return {}
        props = pushes[0].properties
        return {"previous_push": {k: props.get(k) for k in ("model_uri", "pushed_destination", "pushed_version")}}

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Fail before any training is spent on a model that could not be pushed.
        check_writable(self.params["serving_model_dir"])
        return {"pushed_model": {}}

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        push = _Push(
            self.params["serving_model_dir"],
            self.ctx.output_uri("pushed_model"),
            self.ctx.resolved.get("previous_push"),
        )
        pushed = inputs["blessing"] | "Push" >> beam.Map(push, beam.pvalue.AsSingleton(inputs["model"]))
        self.ctx.publish("pushed_model", pushed)
        return {}
