"""Pusher: push a blessed model to a TF Serving model base path (transforms/push_model.py), never over an unjudged one.

A model that is not blessed is not pushed, nor one an InfraValidator could not serve. With change
thresholds, a guarded push checks that what is served is a model its own was judged against
(transforms/_push_record.py says why).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import apache_beam as beam

from beam_pipeline import artifact_io, remote_fs
from beam_pipeline.artifacts import INFRA_BLESSING, MODEL, MODEL_BLESSING, PUSHED_MODEL, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineDefinitionError
from transforms import _push_store
from transforms._push_record import Guard, PushRefused, judged_against
from transforms.push_model import check_destination, check_writable, push_model, served_model

log = logging.getLogger(__name__)

SERVING_MODEL_DIR = "Format-Serving"
RESULT_FILE = "push_result.json"


class _Push:
    """Runs once, after the blessing and the model are committed: push or explain why not."""

    def __init__(
        self,
        serving_model_dir: str,
        result_uri: str,
        *,
        pushed_by: str,
        known_pushes: Mapping[str, str],
        baselines: Mapping[str, list[str]] | None,
    ):
        self.serving_model_dir = serving_model_dir
        self.result_uri = result_uri
        self.pushed_by = pushed_by
        self.known_pushes = dict(known_pushes)
        self.baselines = None if baselines is None else dict(baselines)  # None: blessings are not relative

    def __call__(self, blessing: Artifact, model: Artifact, infra: Artifact | None = None) -> dict[str, Any]:
        blessed_model = blessing.properties.get("model_uri")
        if blessed_model is not None and blessed_model != model.uri:
            raise PipelineDefinitionError(
                f"the blessing {blessing.uri} is for model {blessed_model!r}, not for {model.uri!r}: "
                "wire the Pusher to the same model as the Evaluator"
            )
        properties: dict[str, Any]
        if int(blessing.properties.get("blessed", 0)) != 1:
            why = blessing.properties.get("blessing_message") or "the blessing says blessed=0"
            message = f"model {model.uri} is not blessed; nothing pushed to {self.serving_model_dir} ({why})"
            log.warning("%s", message)
            properties = {"pushed": 0, "push_message": message}
        elif infra is not None and int(infra.properties.get("infra_blessed", 0)) != 1:
            why = infra.properties.get("infra_message") or "the infra blessing says infra_blessed=0"
            message = f"model {model.uri} failed infra validation; nothing pushed to {self.serving_model_dir} ({why})"
            log.warning("%s", message)
            properties = {"pushed": 0, "push_message": message}
        else:
            properties = self._push(blessing, model)
        properties["model_uri"] = model.uri
        record = {**properties, "blessing_uri": blessing.uri}
        text = json.dumps(record, indent=2, sort_keys=True)
        artifact_io.write_text(artifact_io.join(self.result_uri, RESULT_FILE), text)
        return properties

    def _push(self, blessing: Artifact, model: Artifact) -> dict[str, Any]:
        served = served_model(self.serving_model_dir, self.known_pushes)
        if served is not None and served.model_uri == model.uri:
            message = f"model {model.uri} is already version {served.version} at {served.destination}; not copied again"
            log.info("%s", message)
            return {"pushed": 1, "pushed_destination": served.destination, "pushed_version": served.version,
                    "push_message": message}  # fmt: skip
        baseline = blessing.properties.get("baseline_model_uri")
        guard = None
        if self.baselines is not None:
            guard = Guard(model.uri, baseline, judged_against(baseline, self.baselines))
        record = {"model_uri": model.uri, "blessing_uri": blessing.uri, "baseline_model_uri": baseline,
                  "pushed_by": self.pushed_by}  # fmt: skip
        source = artifact_io.join(model.uri, SERVING_MODEL_DIR)
        try:
            version, destination = push_model(
                source, self.serving_model_dir, record=record, guard=guard, known_pushes=self.known_pushes
            )
        except PushRefused as refused:
            log.warning("%s", refused)
            served = refused.served
            # push_refused + blessing_uri let an Evaluator tell a blessing that lost the race from the served one.
            return {"pushed": 0, "push_refused": 1, "push_message": str(refused), "blessing_uri": blessing.uri,
                    "served_version": served.version, "served_model_uri": served.model_uri}  # fmt: skip
        message = f"pushed model {model.uri} as version {version} to {destination}"
        log.info("%s", message)
        return {"pushed": 1, "pushed_destination": destination, "pushed_version": version, "push_message": message}


def _normalized(serving_model_dir: str) -> str:
    """An absolute local path, or the object-store URI without a trailing slash."""
    if remote_fs.is_remote(serving_model_dir):
        return serving_model_dir.rstrip("/")
    return os.path.abspath(serving_model_dir)


def _same_channel(a: Channel | None, b: Channel | None) -> bool:
    return a is not None and b is not None and a.producer is b.producer and a.name == b.name


class Pusher(Component):
    """Push the model to `serving_model_dir/<version>/` (a local directory, s3:// or gs://) when blessed=1.

    Output `pushed_model`: properties pushed (0/1), pushed_destination, pushed_version and
    push_message, and `push_result.json` with the same facts. A model that is not blessed is not
    pushed (pushed=0, with the Evaluator's reason); nor is a blessed one when, with change
    thresholds, another run pushed a model it was not judged against (pushed=0, naming that model).
    Reruns when the versions in the serving directory change: whether a push is needed depends on
    the serving directory, not only on the inputs.
    """

    INPUTS = {
        "model": InputSpec(MODEL),
        "blessing": InputSpec(MODEL_BLESSING),
        "infra_blessing": InputSpec(INFRA_BLESSING, optional=True),
    }
    OUTPUTS = {"pushed_model": PUSHED_MODEL}
    FINGERPRINT_AFTER_RUN = True  # the key records the versions as this push left them, so a rerun finds it

    def __init__(
        self,
        *,
        model: Channel,
        blessing: Channel,
        serving_model_dir: str,
        infra_blessing: Channel | None = None,
        component_id: str | None = None,
    ):
        check_destination(serving_model_dir, "Pusher")
        judged = getattr(getattr(blessing, "producer", None), "inputs", {}).get("model")
        if judged is not None and not _same_channel(judged, model):
            raise PipelineDefinitionError(
                f"Pusher: the blessing comes from {blessing.producer.id}, which judges {judged!r}, but the model "
                f"to push is {model!r}: wire the Pusher to the model its Evaluator judged"
            )
        super().__init__(
            inputs={"model": model, "blessing": blessing, "infra_blessing": infra_blessing},
            params={"serving_model_dir": _normalized(serving_model_dir)},
            component_id=component_id,
        )

    def external_fingerprint(self, inputs=None) -> str:
        """The versions now in serving_model_dir: if someone removed or added one, push again.

        On an object store, the complete versions (with saved_model.pb) and their objects' sizes, from
        one listing: nothing is downloaded, and a push in progress or abandoned does not count.
        """
        directory = self.params["serving_model_dir"]
        if remote_fs.is_remote(directory):
            return _push_store.fingerprint(directory)
        versions = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        return json.dumps([v for v in versions if v.isdigit()])

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """What the push is checked against, from ML Metadata (read here: only the driver talks to it).

        `known_pushes`: which model each of this Pusher's past destinations got, for versions pushed
        before push records existed. `baselines` (only when the blessing's producer has change
        thresholds): for each model its blessings judged, the baselines it was judged against.
        """
        known: dict[str, str] = {}
        pushes = store.latest_artifacts(PUSHED_MODEL.name, pipeline_name, {"pushed": 1, "producer_component": self.id})
        for push in pushes:  # newest first: a destination pushed twice holds its latest model
            destination, model_uri = push.properties.get("pushed_destination"), push.properties.get("model_uri")
            if destination and model_uri:
                known.setdefault(str(destination), str(model_uri))
        resolved: dict[str, Any] = {"known_pushes": known} if known else {}
        producer = self.inputs["blessing"].producer
        if getattr(producer, "has_change_thresholds", False):
            edges: dict[str, set[str]] = {}
            criteria = {"blessed": 1, "producer_component": producer.id}
            for b in store.latest_artifacts(MODEL_BLESSING.name, pipeline_name, criteria):
                model_uri, baseline = b.properties.get("model_uri"), b.properties.get("baseline_model_uri")
                if model_uri and baseline:
                    edges.setdefault(str(model_uri), set()).add(str(baseline))
            resolved["baselines"] = {uri: sorted(bases) for uri, bases in sorted(edges.items())}
        return resolved

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Fail before any training is spent on a model that could not be pushed.
        check_writable(self.params["serving_model_dir"])
        return {"pushed_model": {}}

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        push = _Push(
            self.params["serving_model_dir"],
            ctx.output_uri("pushed_model"),
            pushed_by=f"{ctx.pipeline_name} run {ctx.run_id}",
            known_pushes=ctx.resolved.get("known_pushes", {}),
            baselines=ctx.resolved.get("baselines"),
        )
        extra = {"infra": beam.pvalue.AsSingleton(inputs["infra_blessing"])} if "infra_blessing" in inputs else {}
        pushed = inputs["blessing"] | "Push" >> beam.Map(push, beam.pvalue.AsSingleton(inputs["model"]), **extra)
        ctx.publish("pushed_model", pushed)
        return {}
