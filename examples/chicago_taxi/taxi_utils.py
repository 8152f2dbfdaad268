"""Chicago taxi user module: predict whether a rider tips more than 20% of the fare.

`preprocessing_fn` is run by the Transform component (tf.Transform); `run_fn` by the Trainer.
Raw features arrive as SparseTensors (VarLen features: a CSV cell can be empty) or as dense
tensors when a curated schema declares them FixedLen; both are handled, and every missing value
is imputed here so the model itself never sees a hole.

The exported SavedModel embeds the transform graph and offers three signatures:

* `serving_default`: one named input per raw column except `tips`, each of shape [None] with the
  raw dtype (float32, int64 or string). A missing value is passed as NaN (float32), -1 (int64;
  every taxi integer is >= 0) or "" (string). Returns {"scores": float32 [None, 1]}, the
  probability that the tip exceeds 20% of the fare.
* `from_examples`: `examples`, string [None] of serialized raw tf.train.Example (absent
  features are missing values). Same output.
* `transform_features`: `examples` as above, returns every transformed feature including the
  label `tips_xf` (int64 [None, 1]), for model analysis.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
import tensorflow_transform as tft

DENSE_FLOAT_FEATURES = ["fare", "trip_miles", "trip_seconds"]
BUCKET_FEATURES = ["pickup_latitude", "pickup_longitude", "dropoff_latitude", "dropoff_longitude"]
NUM_BUCKETS = 10
VOCAB_FEATURES = ["payment_type", "company"]
VOCAB_SIZE = 1000
OOV_SIZE = 10
# Integer features used as categories, with the number of valid values [0, n).
CATEGORICAL_FEATURES = {
    "trip_start_hour": 24,
    "trip_start_day": 8,
    "trip_start_month": 13,
    "pickup_community_area": 78,
    "dropoff_community_area": 78,
}
LABEL_SOURCE = "tips"
FARE = "fare"
LABEL_KEY = "tips_xf"

DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "batch_size": 128,
    "learning_rate": 0.003,
    "hidden_units": [64, 32],
    "embedding_dim": 8,
    "seed": 0,  # the same seed, data and steps give the same weights, bit for bit
}


def transformed_name(key: str) -> str:
    return f"{key}_xf"


def _categorical_sizes() -> dict[str, int]:
    """Width of each transformed integer feature; the last id of each range means 'missing'."""
    sizes = {transformed_name(k): n + 1 for k, n in CATEGORICAL_FEATURES.items()}
    sizes.update({transformed_name(k): NUM_BUCKETS + 1 for k in BUCKET_FEATURES})
    sizes.update({transformed_name(k): VOCAB_SIZE + OOV_SIZE + 1 for k in VOCAB_FEATURES})
    return sizes


# -- preprocessing ------------------------------------------------------------------------------


def _present_values(x: tf.Tensor | tf.SparseTensor) -> tf.SparseTensor:
    """The feature as a [batch, 1] SparseTensor holding only its present values.

    Sparse input (VarLen) keeps each row's first value; dense input (FixedLen) treats NaN as
    missing. Analyzers then see real values only, so imputation never skews the statistics.
    """
    if isinstance(x, tf.SparseTensor):
        x = tf.sparse.retain(x, tf.equal(x.indices[:, 1], 0))
        return tf.SparseTensor(x.indices, x.values, tf.stack([x.dense_shape[0], tf.constant(1, tf.int64)]))
    if x.shape.rank == 1:
        x = tf.expand_dims(x, 1)
    x = x[:, :1]
    present = tf.math.logical_not(tf.math.is_nan(x)) if x.dtype.is_floating else tf.ones_like(x, tf.bool)
    indices = tf.where(present)
    return tf.SparseTensor(indices, tf.gather_nd(x, indices), tf.shape(x, out_type=tf.int64))


def _to_dense(x: tf.SparseTensor, default: Any) -> tf.Tensor:
    return tf.sparse.to_dense(x, default_value=tf.constant(default, x.dtype))


def preprocessing_fn(inputs: dict[str, Any]) -> dict[str, tf.Tensor]:
    """tf.Transform: dense [batch, 1] model features plus the 0/1 label `tips_xf`."""
    outputs: dict[str, tf.Tensor] = {}
    for key in DENSE_FLOAT_FEATURES:
        values = _present_values(inputs[key])
        values = tf.SparseTensor(values.indices, tf.cast(values.values, tf.float32), values.dense_shape)
        # Missing values become 0, the mean after scaling.
        outputs[transformed_name(key)] = _to_dense(tft.scale_to_z_score(values), 0.0)
    for key in VOCAB_FEATURES:
        ids = tft.compute_and_apply_vocabulary(
            _present_values(inputs[key]), top_k=VOCAB_SIZE, num_oov_buckets=OOV_SIZE, vocab_filename=key
        )
        outputs[transformed_name(key)] = _to_dense(ids, VOCAB_SIZE + OOV_SIZE)
    for key in BUCKET_FEATURES:
        values = _present_values(inputs[key])
        values = tf.SparseTensor(values.indices, tf.cast(values.values, tf.float32), values.dense_shape)
        outputs[transformed_name(key)] = _to_dense(tft.bucketize(values, NUM_BUCKETS), NUM_BUCKETS)
    for key, size in CATEGORICAL_FEATURES.items():
        values = _to_dense(_present_values(inputs[key]), -1)
        valid = tf.logical_and(values >= 0, values < size)
        outputs[transformed_name(key)] = tf.where(valid, values, tf.cast(size, values.dtype))

    fare = _present_values(inputs[FARE])
    tips = _present_values(inputs[LABEL_SOURCE])
    fare_known = _to_dense(tf.SparseTensor(fare.indices, tf.ones_like(fare.values, tf.int64), fare.dense_shape), 0)
    fare_value = tf.cast(_to_dense(fare, 0), tf.float32)
    tips_value = tf.cast(_to_dense(tips, 0), tf.float32)
    big_tip = tf.logical_and(fare_known > 0, tips_value > 0.2 * fare_value)
    outputs[LABEL_KEY] = tf.cast(big_tip, tf.int64)
    return outputs


# -- model --------------------------------------------------------------------------------------


def _build_model(hp: dict[str, Any]) -> tf.keras.Model:
    """Wide (one-hot categories, linear) and deep (embeddings + scaled floats, MLP) model."""
    inputs: dict[str, tf.keras.Input] = {}
    wide_parts = []
    deep_parts = []
    for key in DENSE_FLOAT_FEATURES:
        name = transformed_name(key)
        inputs[name] = tf.keras.Input(shape=(1,), name=name, dtype=tf.float32)
        deep_parts.append(inputs[name])
    for name, size in _categorical_sizes().items():
        inputs[name] = tf.keras.Input(shape=(1,), name=name, dtype=tf.int64)
        wide_parts.append(
            tf.keras.layers.CategoryEncoding(num_tokens=size, output_mode="one_hot", name=f"onehot_{name}")(
                inputs[name]
            )
        )
        embedded = tf.keras.layers.Embedding(size, hp["embedding_dim"], name=f"embed_{name}")(inputs[name])
        deep_parts.append(tf.keras.layers.Flatten(name=f"flat_{name}")(embedded))
    deep = tf.keras.layers.concatenate(deep_parts, name="deep_inputs")
    for i, units in enumerate(hp["hidden_units"]):
        deep = tf.keras.layers.Dense(units, activation="relu", name=f"deep_{i}")(deep)
    deep_logit = tf.keras.layers.Dense(1, name="deep_logit")(deep)
    wide = tf.keras.layers.concatenate(wide_parts, name="wide_inputs")
    wide_logit = tf.keras.layers.Dense(1, name="wide_logit")(wide)
    logit = tf.keras.layers.add([wide_logit, deep_logit], name="logit")
    scores = tf.keras.layers.Activation("sigmoid", name="scores")(logit)
    return tf.keras.Model(inputs=inputs, outputs=scores)


def _compile(model: tf.keras.Model, hp: dict[str, Any]) -> None:
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=hp["learning_rate"]),
        loss=tf.keras.losses.BinaryCrossentropy(),
        metrics=[tf.keras.metrics.AUC(name="auc"), tf.keras.metrics.BinaryAccuracy(name="accuracy")],
    )


# -- export -------------------------------------------------------------------------------------


def _is_present(value: tf.Tensor) -> tf.Tensor:
    """The serving_default missing-value convention: NaN, -1 or empty string."""
    if value.dtype.is_floating:
        return tf.logical_not(tf.math.is_nan(value))
    if value.dtype == tf.string:
        return tf.not_equal(value, "")
    return tf.not_equal(value, tf.constant(-1, value.dtype))


def _raw_feature(value: tf.Tensor, spec: Any) -> tf.Tensor | tf.SparseTensor:
    """One [batch] request column as the transform graph expects it (sparse or dense per raw spec)."""
    present = _is_present(value)
    if isinstance(spec, tf.io.VarLenFeature):
        rows = tf.where(present)
        indices = tf.concat([rows, tf.zeros_like(rows)], axis=1)
        dense_shape = tf.stack([tf.shape(value, out_type=tf.int64)[0], tf.constant(1, tf.int64)])
        return tf.SparseTensor(indices, tf.boolean_mask(value, present), dense_shape)
    if spec.default_value is not None:
        value = tf.where(present, value, tf.constant(spec.default_value, value.dtype))
    return tf.reshape(value, [-1, *spec.shape])


def _export(model: tf.keras.Model, tf_transform_output: tft.TFTransformOutput, export_dir: str) -> None:
    """Save `model` with the transform graph embedded behind raw-feature and tf.Example signatures."""
    model.tft_layer = tf_transform_output.transform_features_layer()
    raw_spec = tf_transform_output.raw_feature_spec()
    serving_spec = {k: v for k, v in raw_spec.items() if k != LABEL_SOURCE}

    def predict(raw_features: dict[str, Any]) -> dict[str, tf.Tensor]:
        transformed = model.tft_layer(raw_features)
        transformed.pop(LABEL_KEY, None)
        return {"scores": model(transformed)}

    @tf.function(input_signature=[{k: tf.TensorSpec([None], v.dtype, name=k) for k, v in serving_spec.items()}])
    def serve_raw(features):
        return predict({k: _raw_feature(features[k], serving_spec[k]) for k in serving_spec})

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        return predict(tf.io.parse_example(examples, serving_spec))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features(examples):
        return model.tft_layer(tf.io.parse_example(examples, raw_spec))

    model.save(
        export_dir,
        save_format="tf",
        signatures={
            "serving_default": serve_raw.get_concrete_function(),
            "from_examples": serve_examples.get_concrete_function(),
            "transform_features": transform_features.get_concrete_function(),
        },
    )


# -- entry point --------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and TF and run TF's ops deterministically while training.

    Op determinism is process-wide, and an in-process runner runs other stages in this process, so
    it is switched back off afterwards if it was off (TF 2.16 has no public call for that).
    """
    from tensorflow.python.framework import config as tf_config

    was_enabled = tf_config.is_op_determinism_enabled()
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            tf_config.disable_op_determinism()


def run_fn(fn_args: Any) -> None:
    """Train the wide & deep model on transformed examples and export it for serving.

    Hyperparameters (fn_args.hyperparameters overrides DEFAULT_HYPERPARAMETERS): batch_size,
    learning_rate, hidden_units, embedding_dim, seed. Training is deterministic: the seed fixes the
    initial weights and the order of the examples. With fn_args.base_model set, weights start from
    that model, which must have the same architecture.
    """
    hp = {**DEFAULT_HYPERPARAMETERS, **(fn_args.hyperparameters or {})}
    with _deterministic(int(hp["seed"])):
        _train_and_export(fn_args, hp)


def _train_and_export(fn_args: Any, hp: dict[str, Any]) -> None:
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    train = fn_args.make_dataset(fn_args.train_files, hp["batch_size"], LABEL_KEY, seed=hp["seed"])
    evaluation = fn_args.make_dataset(fn_args.eval_files, hp["batch_size"], LABEL_KEY, seed=hp["seed"])
    model = _build_model(hp)
    if fn_args.base_model:
        # Restored into a never-compiled copy, then copied: loading into `model` itself would also
        # restore the base run's optimizer (learning rate, step count, moments) once it is compiled.
        base = _build_model(hp)
        base.load_weights(os.path.join(fn_args.base_model, "variables", "variables")).expect_partial()
        model.set_weights(base.get_weights())
    _compile(model, hp)
    tensorboard = tf.keras.callbacks.TensorBoard(
        log_dir=fn_args.model_run_dir, update_freq=max(1, fn_args.train_steps // 20)
    )
    model.fit(
        train,
        steps_per_epoch=fn_args.train_steps,
        validation_data=evaluation,
        validation_steps=fn_args.eval_steps,
        callbacks=[tensorboard],
        verbose=0,
    )
    _export(model, tf_transform_output, fn_args.serving_model_dir)
