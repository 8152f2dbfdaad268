"""Trainer: run the user's `run_fn` as one stage of the Beam graph, so a remote runner trains on a worker.

The stage takes the committed input artifacts as side inputs, so no runner can start it before the
transformed examples and the transform graph are complete. It exports the model to
`<model uri>/Format-Serving` and TensorBoard logs to the model_run artifact.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, MODEL, MODEL_RUN, SCHEMA, TRANSFORM_GRAPH, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import InputDataError, PipelineDefinitionError
from runners import training_cluster
from transforms._fn_args import FnArgs
from transforms.train_model import TrainModel
from transforms.transform import PAYLOAD_FORMAT

SERVING_DIR = "Format-Serving"


@dataclasses.dataclass(frozen=True)
class _TrainConfig:
    component_id: str
    module_file: str
    train_split: str
    eval_split: str
    train_steps: int
    eval_steps: int
    hyperparameters: dict[str, Any]
    custom_config: dict[str, Any]
    num_workers: int
    model_uri: str
    base_model: str | None


class Trainer(Component):
    """Train and export a model with the user's `run_fn(fn_args: FnArgs)`.

    `examples` must be gzip TFRecords of transformed tf.train.Examples (a materialized Transform
    output). With `warm_start`, weights start from the newest Model this component produced in the
    same pipeline, recorded as an input of the execution. `strategy` picks the tf.distribute
    strategy; `cpu_devices` splits the CPU into that many logical devices for "mirrored".

    With `strategy="multi_worker_mirrored"` and `num_workers=N > 1`, training fans out to N
    processes of one MultiWorkerMirroredStrategy cluster. On a distributed runner they are N Beam
    elements, reshuffled so the runner places them on N SDK workers, which meet in a rendezvous
    under the pipeline root (no TF_CONFIG to write); the runner must run N bundles at once, and if
    not all N start within `rendezvous_timeout_s` the Trainer fails saying so. The in-process
    runner runs one bundle at a time, so there the N workers are local processes on loopback ports.
    Task 0 is the chief: its export is the model; the others export to scratch that is removed.
    run_fn sees `fn_args.task_index` and `fn_args.num_workers`; Keras splits each global batch
    across the workers. With `num_workers=1`, "multi_worker_mirrored" reads a TF_CONFIG the user
    exported, as in TFX.

        trainer = Trainer(examples=..., transform_graph=..., module_file="taxi_utils.py",
                          strategy="multi_worker_mirrored", num_workers=2)
    """

    INPUTS = {
        "examples": InputSpec(EXAMPLES),
        "transform_graph": InputSpec(TRANSFORM_GRAPH),
        "schema": InputSpec(SCHEMA, optional=True),
    }
    OUTPUTS = {"model": MODEL, "model_run": MODEL_RUN}

    def __init__(
        self,
        *,
        examples: Channel,
        transform_graph: Channel,
        module_file: str,
        schema: Channel | None = None,
        train_steps: int = 1000,
        eval_steps: int = 100,
        hyperparameters: Mapping[str, Any] | None = None,
        custom_config: Mapping[str, Any] | None = None,
        warm_start: bool = False,
        strategy: str = "default",
        cpu_devices: int | None = None,
        num_workers: int = 1,
        rendezvous_timeout_s: float = training_cluster.DEFAULT_TIMEOUT_S,
        train_split: str = "train",
        eval_split: str = "eval",
        component_id: str | None = None,
    ):
        if train_steps < 1 or eval_steps < 1:
            raise PipelineDefinitionError(f"train_steps={train_steps}, eval_steps={eval_steps}: both must be >= 1")
        super().__init__(
            inputs={"examples": examples, "transform_graph": transform_graph, "schema": schema},
            params={
                "module_file": module_file,
                "train_steps": train_steps,
                "eval_steps": eval_steps,
                "hyperparameters": dict(hyperparameters or {}),
                "custom_config": dict(custom_config or {}),
                "warm_start": warm_start,
                "strategy": strategy,
                "cpu_devices": cpu_devices,
                "num_workers": num_workers,
                "train_split": train_split,
                "eval_split": eval_split,
            },
            component_id=component_id,
        )
        # How long to wait, not what is trained: kept out of the parameters, so out of the cache key.
        self.rendezvous_timeout_s = float(rendezvous_timeout_s)
        self._train_model(module_file)  # validates the strategy and finds run_fn now, not on a worker

    def _train_model(self, module_file: str, rendezvous_uri: str | None = None) -> TrainModel:
        return TrainModel(
            module_file,
            strategy=self.params["strategy"],
            cpu_devices=self.params["cpu_devices"],
            num_workers=self.params["num_workers"],
            rendezvous_uri=rendezvous_uri,
            rendezvous_timeout_s=self.rendezvous_timeout_s,
            name=self.id,
        )

    def splits_read(self, name: str, splits: Sequence[str]) -> list[str]:
        return []  # training reads the materialized files itself (tf.data), not the graph's batches

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """The newest Model of this Trainer in this pipeline, when warm starting."""
        if not self.params["warm_start"]:
            return {}
        latest = store.latest_artifacts(MODEL.name, pipeline_name, {"producer_component": self.id})
        # Part of the cache key as a resolved artifact: a new starting point means a new result.
        return {"warm_start_model": latest[0]} if latest else {}

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        examples = input_static["examples"]
        payload = examples.get("payload_format", PAYLOAD_FORMAT)
        if payload != PAYLOAD_FORMAT:
            raise PipelineDefinitionError(
                f"{self.id}: examples must be materialized as {PAYLOAD_FORMAT} (Transform(materialize=True)), "
                f"got payload_format={payload!r}"
            )
        splits = examples.get("splits") or []
        missing = [s for s in (self.params["train_split"], self.params["eval_split"]) if s not in splits]
        if splits and missing:
            raise PipelineDefinitionError(f"{self.id}: splits {missing} are not in the examples' splits {splits}")
        return {name: {} for name in self.OUTPUTS}

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        committed = self.ctx.committed_inputs
        warm = self.ctx.resolved.get("warm_start_model")
        num_workers = self.params["num_workers"]
        pipeline = committed["examples"].pipeline
        module_file = self.ctx.module_file("module_file", self.params["module_file"])
        config = _TrainConfig(
            component_id=self.id,
            module_file=module_file,
            train_split=self.params["train_split"],
            eval_split=self.params["eval_split"],
            train_steps=self.params["train_steps"],
            eval_steps=self.params["eval_steps"],
            hyperparameters=self.params["hyperparameters"],
            custom_config=self.params["custom_config"],
            num_workers=num_workers,
            model_uri=self.ctx.output_uri("model"),
            base_model=artifact_io.join(warm.uri, SERVING_DIR) if warm is not None else None,
        )
        side_inputs = {
            "examples": beam.pvalue.AsSingleton(committed["examples"]),
            "transform_graph": beam.pvalue.AsSingleton(committed["transform_graph"]),
        }
        if "schema" in inputs:
            side_inputs["schema"] = beam.pvalue.AsSingleton(inputs["schema"])
            side_inputs["schema_artifact"] = beam.pvalue.AsSingleton(committed["schema"])
        rendezvous = self.ctx.scratch_uri(f"{self.id}-rendezvous") if num_workers > 1 else None
        results = (
            pipeline
            | "Start" >> beam.Create([None])
            | "FnArgs" >> beam.Map(_fn_args, config, self.ctx.output_uri("model_run"), **side_inputs)
            | self._train_model(module_file, rendezvous)
            | "Properties" >> beam.Map(_properties, config, self.params["strategy"])
        )
        self.ctx.publish("model", results | "ModelProperties" >> beam.Map(lambda r: r["model"]))
        self.ctx.publish("model_run", results | "ModelRunProperties" >> beam.Map(lambda r: r["model_run"]))
        return {}


def _fn_args(
    _: None,
    config: _TrainConfig,
    model_run_uri: str,
    examples: Artifact,
    transform_graph: Artifact,
    schema: Any = None,
    schema_artifact: Artifact | None = None,
) -> FnArgs:
    """run_fn's arguments, from the committed input artifacts."""
    payload = examples.properties.get("payload_format")
    if payload != PAYLOAD_FORMAT:
        raise InputDataError(
            f"{config.component_id}: examples at {examples.uri} have payload_format={payload!r}; "
            f"the Trainer reads {PAYLOAD_FORMAT} written by Transform(materialize=True)"
        )
    return FnArgs(
        train_files=[artifact_io.join(examples.split_uri(config.train_split), "*.gz")],
        eval_files=[artifact_io.join(examples.split_uri(config.eval_split), "*.gz")],
        transform_output=transform_graph.uri,
        serving_model_dir=artifact_io.join(config.model_uri, SERVING_DIR),
        model_run_dir=model_run_uri,
        train_steps=config.train_steps,
        eval_steps=config.eval_steps,
        schema_path=artifact_io.join(schema_artifact.uri, artifact_io.SCHEMA_FILE) if schema_artifact else None,
        schema=schema,
        base_model=config.base_model,
        hyperparameters=dict(config.hyperparameters),
        custom_config=dict(config.custom_config),
        num_workers=config.num_workers,
    )


def _properties(summary: dict[str, Any], config: _TrainConfig, strategy: str) -> dict[str, dict[str, Any]]:
    """The properties of the model and of the training run."""
    tasks = summary["tasks"]
    model_properties: dict[str, Any] = {"serving_dir": SERVING_DIR}
    if config.base_model:
        model_properties["warm_started_from"] = config.base_model
    run_properties = {
        "strategy": strategy,
        "num_replicas": tasks[0]["num_replicas"],
        "num_workers": config.num_workers,
        # Where each task trained: its host, its training process and the Beam worker that started it.
        "tasks": json.dumps(tasks),
    }
    return {"model": model_properties, "model_run": run_properties}
