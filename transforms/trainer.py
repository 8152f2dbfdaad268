"""Trainer: run the user's `run_fn` as one stage of the Beam graph, so a remote runner trains on a worker.

The stage takes the committed input artifacts as side inputs, so no runner can start it before the
transformed examples and the transform graph are complete. It exports the model to
`<model uri>/Format-Serving` and TensorBoard logs to the model_run artifact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, MODEL, MODEL_RUN, SCHEMA, TRANSFORM_GRAPH, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import BeamPipelineError, InputDataError, PipelineDefinitionError, UserModuleError
from runners import training
from transforms import _user_module
from transforms._fn_args import FnArgs
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
    strategy: str
    cpu_devices: int | None
    model_uri: str
    model_run_uri: str
    base_model: str | None


class Trainer(Component):
    """Train and export a model with the user's `run_fn(fn_args: FnArgs)`.

    `examples` must be gzip TFRecords of transformed tf.train.Examples (a materialized Transform
    output). With `warm_start`, weights start from the newest Model this component produced in the
    same pipeline, recorded as an input of the execution. `strategy` picks the tf.distribute
    strategy; `cpu_devices` splits the CPU into that many logical devices for "mirrored".
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
        train_split: str = "train",
        eval_split: str = "eval",
        component_id: str | None = None,
    ):
        training.validate(strategy, cpu_devices)
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
                "train_split": train_split,
                "eval_split": eval_split,
            },
            component_id=component_id,
        )
        _user_module.load_module(module_file, ["run_fn"], self.id)

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
        config = _TrainConfig(
            component_id=self.id,
            module_file=self.ctx.module_file("module_file", self.params["module_file"]),
            train_split=self.params["train_split"],
            eval_split=self.params["eval_split"],
            train_steps=self.params["train_steps"],
            eval_steps=self.params["eval_steps"],
            hyperparameters=self.params["hyperparameters"],
            custom_config=self.params["custom_config"],
            strategy=self.params["strategy"],
            cpu_devices=self.params["cpu_devices"],
            model_uri=self.ctx.output_uri("model"),
            model_run_uri=self.ctx.output_uri("model_run"),
            base_model=artifact_io.join(warm.uri, SERVING_DIR) if warm is not None else None,
        )
        side_inputs = {
            "examples": beam.pvalue.AsSingleton(committed["examples"]),
            "transform_graph": beam.pvalue.AsSingleton(committed["transform_graph"]),
        }
        if "schema" in inputs:
            side_inputs["schema"] = beam.pvalue.AsSingleton(inputs["schema"])
            side_inputs["schema_artifact"] = beam.pvalue.AsSingleton(committed["schema"])
        results = (
            committed["examples"].pipeline
            | "Start" >> beam.Create([None])
            | "Train" >> beam.Map(_train, config, **side_inputs)
        )
        self.ctx.publish("model", results | "ModelProperties" >> beam.Map(lambda r: r["model"]))
        self.ctx.publish("model_run", results | "ModelRunProperties" >> beam.Map(lambda r: r["model_run"]))
        return {}


def _train(
    _: Any,
    config: _TrainConfig,
    examples: Artifact,
    transform_graph: Artifact,
    schema: Any = None,
    schema_artifact: Artifact | None = None,
) -> dict[str, dict[str, Any]]:
    """The training stage: build FnArgs from the committed inputs, call run_fn, check the export."""
    payload = examples.properties.get("payload_format")
    if payload != PAYLOAD_FORMAT:
        raise InputDataError(
            f"{config.component_id}: examples at {examples.uri} have payload_format={payload!r}; "
            f"the Trainer reads {PAYLOAD_FORMAT} written by Transform(materialize=True)"
        )
    # A file, not the directory: on an object store a directory is a prefix, which exists() never sees.
    if config.base_model and not FileSystems.exists(artifact_io.join(config.base_model, "saved_model.pb")):
        raise InputDataError(f"{config.component_id}: warm-start model {config.base_model} no longer exists")
    serving_dir = artifact_io.join(config.model_uri, SERVING_DIR)
    for stale in (serving_dir, config.model_run_uri):  # left over by a failed attempt of this stage
        _remove_tree(stale)
    fn_args = FnArgs(
        train_files=[artifact_io.join(examples.split_uri(config.train_split), "*.gz")],
        eval_files=[artifact_io.join(examples.split_uri(config.eval_split), "*.gz")],
        transform_output=transform_graph.uri,
        serving_model_dir=serving_dir,
        model_run_dir=config.model_run_uri,
        train_steps=config.train_steps,
        eval_steps=config.eval_steps,
        schema_path=artifact_io.join(schema_artifact.uri, artifact_io.SCHEMA_FILE) if schema_artifact else None,
        schema=schema,
        base_model=config.base_model,
        hyperparameters=dict(config.hyperparameters),
        custom_config=dict(config.custom_config),
    )
    if training.needs_fresh_process(config.strategy, config.cpu_devices):
        replicas = training.run_in_fresh_process(
            run_user_fn,
            config.component_id,
            config.module_file,
            fn_args,
            config.strategy,
            config.cpu_devices,
            paths=[config.module_file, config.model_uri, examples.uri, transform_graph.uri, config.base_model or ""],
        )
    else:
        replicas = run_user_fn(config.component_id, config.module_file, fn_args, config.strategy, config.cpu_devices)
    if not FileSystems.exists(artifact_io.join(serving_dir, "saved_model.pb")):
        raise UserModuleError(
            f"{config.component_id}: run_fn in {config.module_file} returned without exporting a SavedModel "
            f"to fn_args.serving_model_dir ({serving_dir})"
        )
    model_properties: dict[str, Any] = {"serving_dir": SERVING_DIR}
    if config.base_model:
        model_properties["warm_started_from"] = config.base_model
    return {
        "model": model_properties,
        "model_run": {"strategy": config.strategy, "num_replicas": replicas},
    }


def _remove_tree(uri: str) -> None:
    """Delete a directory and everything under it; tf.io.gfile treats an object-store prefix as one."""
    import tensorflow as tf

    if tf.io.gfile.exists(uri):
        tf.io.gfile.rmtree(uri)


def run_user_fn(component_id: str, module_file: str, fn_args: FnArgs, strategy: str, cpu_devices: int | None) -> int:
    """Load the module, create the strategy and call run_fn inside its scope; returns the replica count.

    Module-level so a spawned process can run it; every failure leaves as a one-message error.
    """
    module = _user_module.load_module(module_file, ["run_fn"], component_id)
    distribution = training.make_strategy(strategy, cpu_devices)
    fn_args.strategy = distribution
    try:
        with distribution.scope():
            module.run_fn(fn_args)
    except BeamPipelineError:
        raise
    except Exception as e:
        raise UserModuleError(f"{component_id}: run_fn in {module_file} raised {type(e).__name__}: {e}") from e
    return int(distribution.num_replicas_in_sync)
