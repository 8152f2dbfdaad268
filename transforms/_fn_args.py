"""FnArgs: everything a user's run_fn needs to train and export a model, as TFX hands it over."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from tensorflow_metadata.proto.v0 import schema_pb2


@dataclasses.dataclass
class FnArgs:
    """Arguments of `run_fn(fn_args)`.

    `train_files`/`eval_files` are glob patterns of gzip TFRecord files of transformed
    tf.train.Examples; `transform_output` is the TFT WriteTransformFn directory
    (open it with `tft.TFTransformOutput`). `base_model` is the SavedModel directory of the
    model to warm start from, or None. `strategy` is the tf.distribute strategy the Trainer
    created; run_fn is already called inside its scope.

    Reproducible training is run_fn's job, as in TFX (the seed is a hyperparameter of the model):
    seed Python, NumPy and TF (`tf.keras.utils.set_random_seed`), turn on
    `tf.config.experimental.enable_op_determinism()`, and read data with
    `make_dataset(..., seed=...)`, whose file order and shuffle then repeat exactly. The taxi example
    module does all three.
    """

    train_files: list[str]
    eval_files: list[str]
    transform_output: str
    serving_model_dir: str
    model_run_dir: str
    train_steps: int
    eval_steps: int
    schema_path: str | None = None
    schema: schema_pb2.Schema | None = None
    base_model: str | None = None
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    custom_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    strategy: Any = None
    task_index: int = 0
    num_workers: int = 1

    @property
    def is_chief(self) -> bool:
        return self.task_index == 0

    @functools.cached_property
    def tf_transform_output(self) -> Any:
        import tensorflow_transform as tft

        return tft.TFTransformOutput(self.transform_output)

    def make_dataset(
        self,
        file_patterns: list[str],
        batch_size: int,
        label_key: str | None = None,
        *,
        shuffle: bool = True,
        num_epochs: int | None = None,
        seed: int | None = None,
    ) -> Any:
        """A tf.data.Dataset of batched transformed features (and the label if `label_key` is given).

        Repeats forever unless `num_epochs` is set, so training is bounded by steps, like TFX. With
        `seed`, the file order and the shuffle are seeded; files are read one after another and
        parsed in order, so the same files give the same batches on every run.
        """
        import tensorflow as tf

        dataset = tf.data.experimental.make_batched_features_dataset(
            file_pattern=file_patterns,
            batch_size=batch_size,
            features=self.tf_transform_output.transformed_feature_spec(),
            reader=lambda files: tf.data.TFRecordDataset(files, compression_type="GZIP"),
            label_key=label_key,
            num_epochs=num_epochs,
            shuffle=shuffle,
            shuffle_seed=seed,
            reader_num_threads=1,  # >1 interleaves files in whichever order reads finish
            sloppy_ordering=False,
        )
        if self.num_workers > 1:
            dataset = dataset.with_options(self._shard_options(file_patterns))
        return dataset

    def _shard_options(self, file_patterns: list[str]) -> Any:
        """How workers split the data: by file when there is a file for each, else by element.

        tf.distribute's default (AUTO) insists on files and fails with fewer files than workers.
        """
        import tensorflow as tf

        files = sum(len(tf.io.gfile.glob(p)) for p in file_patterns)
        policy = tf.data.experimental.AutoShardPolicy
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = policy.FILE if files >= self.num_workers else policy.DATA
        return options
