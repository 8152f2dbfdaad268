"""A taxi Trainer module that also records what each training task did, for the multi-worker tests.

The module is the taxi example's own source with a run_fn wrapped around it, in one file, so an SDK
worker that loads the staged copy from the object store needs nothing from this checkout.
"""

from __future__ import annotations

import json
import os

from tests.test_transform import TAXI_MODULE

_WRAPPER = '''

_taxi_run_fn = run_fn


def run_fn(fn_args):
    """The taxi run_fn, then a record of this task: its place, its per-replica batch, the steps it ran."""
    import json as _json
    import os as _os

    config = fn_args.custom_config
    if config.get("fail_task") == fn_args.task_index:
        raise ValueError(f"task {fn_args.task_index} fails on purpose")
    hp = {**DEFAULT_HYPERPARAMETERS, **(fn_args.hyperparameters or {})}
    probe = fn_args.make_dataset(fn_args.train_files, hp["batch_size"], LABEL_KEY, seed=hp["seed"])
    _, labels = next(iter(fn_args.strategy.experimental_distribute_dataset(probe)))
    local_batch = int(fn_args.strategy.experimental_local_results(labels)[0].shape[0])
    _taxi_run_fn(fn_args)
    reader = tf.train.load_checkpoint(_os.path.join(fn_args.serving_model_dir, "variables", "variables"))
    steps = int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    record = {
        "task_index": fn_args.task_index,
        "num_workers": fn_args.num_workers,
        "is_chief": fn_args.is_chief,
        "replicas": int(fn_args.strategy.num_replicas_in_sync),
        "local_batch": local_batch,
        "steps": steps,
        "pid": _os.getpid(),
        "tf_config": _json.loads(_os.environ.get("TF_CONFIG", "{}")),
    }
    tf.io.gfile.makedirs(config["record_dir"])
    path = f"{config['record_dir']}/task-{fn_args.task_index}.json"
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(_json.dumps(record))
'''


def write_recording_module(directory: str) -> str:
    """The taxi module with the recording run_fn, written to `directory`; its path."""
    with open(TAXI_MODULE) as f:
        source = f.read()
    path = os.path.join(directory, "recording_taxi_module.py")
    with open(path, "w") as f:
        f.write(source + _WRAPPER)
    return path


def read_records(record_dir: str) -> dict[int, dict]:
    """The task records under `record_dir` (a local path or an object-store prefix), by task index."""
    import tensorflow as tf

    records = {}
    for name in tf.io.gfile.listdir(record_dir):
        with tf.io.gfile.GFile(f"{record_dir.rstrip('/')}/{name}") as f:
            record = json.loads(f.read())
        records[record["task_index"]] = record
    return records
