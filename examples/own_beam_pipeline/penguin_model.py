"""A small Keras classifier of penguin species from z-scored measurements: the example's run_fn."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

FEATURES = ["culmen_length_mm", "culmen_depth_mm", "flipper_length_mm", "body_mass_g"]
LABEL = "species"


def run_fn(fn_args: Any) -> None:
    """Train on fn_args.train_files for train_steps, then save a Keras SavedModel to serving_model_dir."""
    tf.keras.utils.set_random_seed(int(fn_args.hyperparameters.get("seed", 1)))
    train = fn_args.make_dataset(fn_args.train_files, batch_size=32, label_key=LABEL, seed=1)
    evaluation = fn_args.make_dataset(fn_args.eval_files, batch_size=32, label_key=LABEL, seed=1)
    inputs = {name: tf.keras.Input(shape=(1,), name=name) for name in FEATURES}
    hidden = tf.keras.layers.Dense(8, activation="relu")(tf.keras.layers.Concatenate()(list(inputs.values())))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, activation="softmax")(hidden))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(
        train,
        steps_per_epoch=fn_args.train_steps,
        validation_data=evaluation,
        validation_steps=fn_args.eval_steps,
        verbose=0,
    )
    model.save(fn_args.serving_model_dir, save_format="tf")
