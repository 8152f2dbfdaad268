"""TrainModel: run a TFX-style `run_fn(fn_args)` as a Beam stage, on one worker or fanned out to N."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io
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


@dataclasses.dataclass(frozen=True)
class _Settings:
    name: str
    module_file: str
    strategy: str
    cpu_devices: int | None
    num_workers: int
    rendezvous_uri: str | None  # where the tasks meet when each is its own Beam element
    rendezvous_timeout_s: float


class TrainModel(beam.PTransform):
    """Call `run_fn(fn_args)` of `module_file` for each FnArgs in the input; one summary per model trained.

    Usable in any Beam pipeline; the Trainer component builds the FnArgs from its artifacts. Example::

        args = FnArgs(train_files=["/data/train/*.gz"], eval_files=["/data/eval/*.gz"],
                      transform_output="/data/transform_fn", serving_model_dir="/models/taxi",
                      model_run_dir="/logs/taxi", train_steps=1000, eval_steps=100)
        summary = p | beam.Create([args]) | TrainModel("taxi_utils.py")

    run_fn runs inside the scope of the tf.distribute `strategy` ("default", "mirrored" with
    `cpu_devices` logical CPUs, or "multi_worker_mirrored"). With `num_workers=N > 1` the N tasks of
    one MultiWorkerMirroredStrategy cluster are N Beam elements, reshuffled so that a distributed
    runner places them on N SDK workers; they meet under `rendezvous_uri` (required then, and
    reachable from every worker) within `rendezvous_timeout_s`. A runner that runs one bundle at a
    time (the in-process one) gets the N tasks as local processes instead. Task 0 is the chief; the
    others export to scratch that is removed. Output: one element per FnArgs, `{"serving_model_dir":
    ..., "tasks": [per task: task_index, num_replicas, host, pid, parent_pid]}`, once the chief's
    SavedModel is in `serving_model_dir`.
    """

    def __init__(
        self,
        module_file: str,
        *,
        strategy: str = "default",
        cpu_devices: int | None = None,
        num_workers: int = 1,
        rendezvous_uri: str | None = None,
        rendezvous_timeout_s: float = training_cluster.DEFAULT_TIMEOUT_S,
        name: str = "TrainModel",
    ):
        super().__init__()
        training.validate(strategy, cpu_devices, num_workers)
        if not rendezvous_timeout_s > 0:
            raise PipelineDefinitionError(f"rendezvous_timeout_s={rendezvous_timeout_s!r}: expected a positive number")
        _user_module.load_module(module_file, ["run_fn"], name)  # a missing run_fn fails here, not on a worker
        self._settings = _Settings(
            name, module_file, strategy, cpu_devices, num_workers, rendezvous_uri, float(rendezvous_timeout_s)
        )

    def expand(self, fn_args: beam.PCollection) -> beam.PCollection:
        settings = self._settings
        # One element per task where the runner can run them at once; the in-process one cannot.
        fan_out = settings.num_workers > 1 and not training_cluster.runs_bundles_one_at_a_time(fn_args.pipeline.runner)
        if fan_out and not settings.rendezvous_uri:
            raise PipelineDefinitionError(
                f"{settings.name}: num_workers={settings.num_workers} on a distributed runner needs a "
                "rendezvous_uri every worker can reach"
            )
        tasks = fn_args | "Tasks" >> beam.FlatMap(_tasks, settings.num_workers if fan_out else 0)
        if fan_out:  # a Reshuffle so the runner spreads the tasks over its workers
            tasks = tasks | "Spread" >> beam.Reshuffle()
        return (
            tasks
            | "Train" >> beam.FlatMap(_train, settings)
            | "ByModel" >> beam.GroupByKey()
            | "Finish" >> beam.Map(_finish, settings)
        )


def _tasks(fn_args: FnArgs, num_tasks: int) -> list[tuple[int | None, FnArgs]]:
    """(task index, fn_args) per Beam element; None: every task runs in this element."""
    return [(i, fn_args) for i in range(num_tasks)] if num_tasks else [(None, fn_args)]


def _train(element: tuple[int | None, FnArgs], settings: _Settings) -> list[tuple[str, dict[str, Any]]]:
    """Train task `task` of the cluster (None: all of them here); keyed by the model directory."""
    task, chief_args = element
    # A file, not the directory: on an object store a directory is a prefix, which exists() never sees.
    if chief_args.base_model and not FileSystems.exists(artifact_io.join(chief_args.base_model, "saved_model.pb")):
        raise InputDataError(f"{settings.name}: warm-start model {chief_args.base_model} no longer exists")
    if task in (None, 0):  # the chief's outputs, left over by a failed attempt of this stage
        for stale in (chief_args.serving_model_dir, chief_args.model_run_dir):
            _remove_tree(stale)
    paths = [settings.module_file, chief_args.serving_model_dir, chief_args.transform_output]
    paths += [chief_args.base_model or "", *chief_args.train_files, *chief_args.eval_files]
    key = chief_args.serving_model_dir
    if settings.num_workers == 1:
        args = (settings.name, settings.module_file, chief_args, settings.strategy, settings.cpu_devices)
        if training.needs_fresh_process(settings.strategy, settings.cpu_devices):
            return [(key, training.run_in_fresh_process(run_user_fn, *args, paths=paths))]
        return [(key, run_user_fn(*args))]
    # Non-chief tasks export and log to scratch on this worker's own disk, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="bp-train-", ignore_cleanup_errors=True) as scratch:

        def task_args(index: int) -> tuple:
            fn_args = chief_args if index == 0 else _worker_args(chief_args, index, f"{scratch}/task-{index}")
            return (settings.name, settings.module_file, fn_args, settings.strategy, settings.cpu_devices)

        if task is None:
            summaries = training_cluster.run_local_cluster(task_args, run_user_fn, settings.num_workers, paths)
        else:
            rendezvous = training_cluster.Rendezvous(
                settings.rendezvous_uri, settings.num_workers, settings.rendezvous_timeout_s
            )
            summaries = [training_cluster.run_cluster_task(rendezvous, task, run_user_fn, task_args(task), paths)]
    return [(key, s) for s in summaries]


def _worker_args(chief: FnArgs, index: int, scratch: str) -> FnArgs:
    """A non-chief task's FnArgs: the same data and settings, its exports and logs in its scratch."""
    return dataclasses.replace(
        chief, serving_model_dir=f"{scratch}/serving", model_run_dir=f"{scratch}/logs", task_index=index
    )


def _finish(keyed: tuple[str, list[dict[str, Any]]], settings: _Settings) -> dict[str, Any]:
    """Once every task of one model is done: check the chief's export; the model's summary."""
    serving_dir, summaries = keyed
    tasks = sorted(summaries, key=_index)
    indexes = [t["task_index"] for t in tasks]
    if indexes != list(range(settings.num_workers)):
        raise TrainingClusterError(
            f"{settings.name}: training tasks {indexes} finished, expected 0..{settings.num_workers - 1}"
        )
    if not FileSystems.exists(artifact_io.join(serving_dir, "saved_model.pb")):
        raise UserModuleError(
            f"{settings.name}: run_fn in {settings.module_file} returned without exporting a SavedModel "
            f"to fn_args.serving_model_dir ({serving_dir})"
        )
    return {"serving_model_dir": serving_dir, "tasks": tasks}


def _index(task: dict[str, Any]) -> int:
    return task["task_index"]


def _remove_tree(uri: str) -> None:
    """Delete a directory and everything under it; tf.io.gfile treats an object-store prefix as one."""
    import tensorflow as tf

    if tf.io.gfile.exists(uri):
        tf.io.gfile.rmtree(uri)


def run_user_fn(name: str, module_file: str, fn_args: FnArgs, strategy: str, cpu_devices: int | None) -> dict[str, Any]:
    """Load the module, create the strategy and call run_fn inside its scope; a summary of the task.

    Module-level so a spawned process can run it; every failure leaves as a one-message error.
    """
    module = _user_module.load_module(module_file, ["run_fn"], name)
    distribution = training.make_strategy(strategy, cpu_devices)
    fn_args.strategy = distribution
    try:
        with distribution.scope():
            module.run_fn(fn_args)
    except BeamPipelineError:
        raise
    except Exception as e:
        raise UserModuleError(f"{name}: run_fn in {module_file} raised {type(e).__name__}: {e}") from e
    return {
        "task_index": fn_args.task_index,
        "num_replicas": int(distribution.num_replicas_in_sync),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "parent_pid": os.getppid(),
    }
