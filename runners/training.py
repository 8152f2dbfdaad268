"""tf.distribute strategy selection for the Trainer, and a fresh process when TF is already initialised.

Logical CPU devices and collective ops can only be configured before the TensorFlow runtime starts.
Inside a Beam worker that already ran TensorFlow (tf.Transform in the same process, say) the
Trainer therefore trains in a freshly spawned interpreter instead.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Sequence
from typing import Any

from beam_pipeline.errors import PipelineDefinitionError

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored")


def validate(strategy: str, cpu_devices: int | None, num_workers: int = 1) -> None:
    """Reject a bad strategy configuration when the pipeline is defined, not when training starts."""
    if strategy not in STRATEGIES:
        raise PipelineDefinitionError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise PipelineDefinitionError(f"num_workers={num_workers!r}: expected a positive integer")
    if num_workers > 1 and strategy != "multi_worker_mirrored":
        raise PipelineDefinitionError(
            f"num_workers={num_workers} needs strategy='multi_worker_mirrored', not {strategy!r}"
        )
    if cpu_devices is not None:
        if strategy != "mirrored":
            raise PipelineDefinitionError(f"cpu_devices is only meaningful with strategy='mirrored', not {strategy!r}")
        if not isinstance(cpu_devices, int) or cpu_devices < 1:
            raise PipelineDefinitionError(f"cpu_devices={cpu_devices!r}: expected a positive integer")


def _configure_cpu_devices(count: int) -> bool:
    """Split the CPU into `count` logical devices; False if TF started already with another split."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # the runtime is initialised: the configuration can no longer change
        pass
    return len(tf.config.list_logical_devices("CPU")) == count


def needs_fresh_process(strategy: str, cpu_devices: int | None) -> bool:
    """True when this process cannot host the strategy (and configures it here when it can)."""
    if strategy == "multi_worker_mirrored":
        return True
    if strategy == "mirrored" and cpu_devices:
        return not _configure_cpu_devices(cpu_devices)
    return False


def make_strategy(strategy: str, cpu_devices: int | None = None) -> Any:
    """The tf.distribute strategy; multi-worker reads the cluster from the TF_CONFIG variable
    (which runners/training_cluster.py sets for a Trainer with num_workers > 1)."""
    import tensorflow as tf

    validate(strategy, cpu_devices)
    if strategy == "default":
        return tf.distribute.get_strategy()
    if strategy == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cpu_devices:
        if not _configure_cpu_devices(cpu_devices):
            raise RuntimeError(
                f"cannot split the CPU into {cpu_devices} logical devices: TensorFlow is already initialised "
                "in this process; train in a fresh process (runners.training.run_in_fresh_process)"
            )
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.MirroredStrategy()


def reach(paths: Sequence[str]) -> None:
    """Set up a spawned interpreter to open `paths` (object stores need it, see remote_fs.enable_for)."""
    from beam_pipeline import remote_fs

    remote_fs.enable_for(paths)
    if remote_fs.used_s3():  # tensorflow-io would abort this process at exit: leave quietly once done
        atexit.register(remote_fs.exit_now, 0)


def run_in_fresh_process(fn: Callable[..., Any], *args: Any, paths: Sequence[str] = ()) -> Any:
    """Call fn(*args) in a newly spawned interpreter; its result or exception comes back here.

    `fn` and `args` must be picklable by reference (module-level functions, plain data). `paths` are
    the files and directories fn opens, so their filesystems (s3://, gs://) are reachable there too.
    """
    from runners.training_cluster import TrainingProcess, supervise

    return supervise([TrainingProcess("training process", fn, args, {}, paths)])[0]
