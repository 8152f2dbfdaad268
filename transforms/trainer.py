"""Trainer: run the user's `run_fn` as one stage of the Beam graph, so a remote runner trains on a worker.

The stage takes the committed input artifacts as side inputs, so no runner can start it before the
transformed examples and the transform graph are complete. It exports the model to
`<model uri>/Format-Serving` and TensorBoard logs to the model_run artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, MODEL, MODEL_RUN, SCHEMA, TRANSFORM_GRAPH, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import (
    BeamPipelineError,
    InputDataError,
    PipelineDefinitionError,
    TrainingClusterError,
    UserModuleError,
)
from runners import training, training_cluster
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
    num_workers: int
    # Where the tasks of a multi-worker cluster meet, when each is its own Beam element (else None).
    rendezvous_uri: str | None
    rendezvous_timeout_s: float
    model_uri: str
    model_run_uri: str
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
        training.validate(strategy, cpu_devices, num_workers)
        if not rendezvous_timeout_s > 0:
            raise PipelineDefinitionError(f"rendezvous_timeout_s={rendezvous_timeout_s!r}: expected a positive number")
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
        _user_module.load_module(module_file, ["run_fn"], self.id)

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
        # One element per task where the runner can run them at once; the in-process one cannot.
        fan_out = num_workers > 1 and not training_cluster.runs_bundles_one_at_a_time(pipeline.runner)
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
            num_workers=num_workers,
            rendezvous_uri=self.ctx.scratch_uri(f"{self.id}-rendezvous") if fan_out else None,
            rendezvous_timeout_s=self.rendezvous_timeout_s,
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
        tasks = pipeline | "Start" >> beam.Create(list(range(num_workers)) if fan_out else [None])
        if fan_out:  # a Reshuffle so the runner spreads the tasks over its workers
            tasks = tasks | "Spread" >> beam.Reshuffle()
        results = (
            tasks
            | "Train" >> beam.FlatMap(_train, config, **side_inputs)
            | "AllTasks" >> beam.combiners.ToList()
            | "Finish" >> beam.Map(_finish, config)
        )
        self.ctx.publish("model", results | "ModelProperties" >> beam.Map(lambda r: r["model"]))
        self.ctx.publish("model_run", results | "ModelRunProperties" >> beam.Map(lambda r: r["model_run"]))
        return {}


def _train(
    task: int | None,
    config: _TrainConfig,
    examples: Artifact,
    transform_graph: Artifact,
    schema: Any = None,
    schema_artifact: Artifact | None = None,
) -> list[dict[str, Any]]:
    """Train task `task` of the cluster (None: all of them here); a summary of each task it ran."""
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
    if task in (None, 0):  # the chief's outputs, left over by a failed attempt of this stage
        for stale in (serving_dir, config.model_run_uri):
            _remove_tree(stale)
    chief_args = FnArgs(
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
        num_workers=config.num_workers,
    )
    paths = [config.module_file, config.model_uri, examples.uri, transform_graph.uri, config.base_model or ""]
    if config.num_workers == 1:
        args = (config.component_id, config.module_file, chief_args, config.strategy, config.cpu_devices)
        if training.needs_fresh_process(config.strategy, config.cpu_devices):
            return [training.run_in_fresh_process(run_user_fn, *args, paths=paths)]
        return [run_user_fn(*args)]
    # Non-chief tasks export and log to scratch on this worker's own disk, removed afterwards.
    with tempfile.TemporaryDirectory(prefix=f"bp-{config.component_id}-", ignore_cleanup_errors=True) as scratch:

        def task_args(index: int) -> tuple:
            fn_args = chief_args if index == 0 else _worker_args(chief_args, index, f"{scratch}/task-{index}")
            return (config.component_id, config.module_file, fn_args, config.strategy, config.cpu_devices)

        if task is None:
            return training_cluster.run_local_cluster(task_args, run_user_fn, config.num_workers, paths)
        rendezvous = training_cluster.Rendezvous(config.rendezvous_uri, config.num_workers, config.rendezvous_timeout_s)
        return [training_cluster.run_cluster_task(rendezvous, task, run_user_fn, task_args(task), paths)]


def _worker_args(chief: FnArgs, index: int, scratch: str) -> FnArgs:
    """A non-chief task's FnArgs: the same data and settings, its exports and logs in its scratch."""
    return dataclasses.replace(
        chief, serving_model_dir=f"{scratch}/serving", model_run_dir=f"{scratch}/logs", task_index=index
    )


def _finish(tasks: list[dict[str, Any]], config: _TrainConfig) -> dict[str, dict[str, Any]]:
    """Once every task is done: check the chief's export; the properties of the model and the run."""
    indexes = sorted(t["task_index"] for t in tasks)
    if indexes != list(range(config.num_workers)):
        raise TrainingClusterError(
            f"{config.component_id}: training tasks {indexes} finished, expected 0..{config.num_workers - 1}"
        )
    serving_dir = artifact_io.join(config.model_uri, SERVING_DIR)
    if not FileSystems.exists(artifact_io.join(serving_dir, "saved_model.pb")):
        raise UserModuleError(
            f"{config.component_id}: run_fn in {config.module_file} returned without exporting a SavedModel "
            f"to fn_args.serving_model_dir ({serving_dir})"
        )
    model_properties: dict[str, Any] = {"serving_dir": SERVING_DIR}
    if config.base_model:
        model_properties["warm_started_from"] = config.base_model
    run_properties = {
        "strategy": config.strategy,
        "num_replicas": tasks[0]["num_replicas"],
        "num_workers": config.num_workers,
        # Where each task trained: its host, its training process and the Beam worker that started it.
        "tasks": json.dumps(sorted(tasks, key=_index)),
    }
    return {"model": model_properties, "model_run": run_properties}


def _index(task: dict[str, Any]) -> int:
    return task["task_index"]


def _remove_tree(uri: str) -> None:
    """Delete a directory and everything under it; tf.io.gfile treats an object-store prefix as one."""
    import tensorflow as tf

    if tf.io.gfile.exists(uri):
        tf.io.gfile.rmtree(uri)


def run_user_fn(
    component_id: str, module_file: str, fn_args: FnArgs, strategy: str, cpu_devices: int | None
) -> dict[str, Any]:
    """Load the module, create the strategy and call run_fn inside its scope; a summary of the task.

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
    return {
        "task_index": fn_args.task_index,
        "num_replicas": int(distribution.num_replicas_in_sync),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "parent_pid": os.getppid(),
    }
