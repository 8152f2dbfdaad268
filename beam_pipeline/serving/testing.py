"""A tiny SavedModel with the Pusher's signature contract, for tests, benchmarks and demos.

It is written with plain `tf.Module` + `tf.function` so that building it takes a second and needs no
training: `serving_default` takes raw features, `from_examples` serialized tf.train.Example protos, and
both return `{"scores": float32 [None, 1]}`. `bias` tells versions apart; `hidden_units` adds a dense
layer stack so a benchmark can give the model a realistic per-call cost.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import tensorflow as tf

# Raw feature name -> dtype; every feature is required by both signatures.
FEATURES: dict[str, tf.DType] = {
    "trip_miles": tf.float32,
    "trip_seconds": tf.int64,
    "payment_type": tf.string,
}


class _DemoModel(tf.Module):
    def __init__(self, bias: float, hidden_units: tuple[int, ...]):
        super().__init__()
        self.bias = tf.Variable(bias, dtype=tf.float32)
        rng = np.random.default_rng(0)
        sizes = (3, *hidden_units, 1) if hidden_units else ()
        self.layers = [
            tf.Variable(rng.normal(scale=0.1, size=(a, b)).astype(np.float32)) for a, b in itertools.pairwise(sizes)
        ]

    def _score(self, trip_miles: tf.Tensor, trip_seconds: tf.Tensor, payment_type: tf.Tensor) -> dict[str, tf.Tensor]:
        cash = tf.cast(tf.equal(payment_type, "Cash"), tf.float32)
        # A readable term keeps expected scores easy to compute in tests: sigmoid(0.1*miles - cash + bias).
        logit = 0.1 * trip_miles - cash + self.bias
        if self.layers:
            out = tf.stack([trip_miles, tf.cast(trip_seconds, tf.float32) / 60.0, cash], axis=1)
            for i, w in enumerate(self.layers):
                out = tf.matmul(out, w)
                if i < len(self.layers) - 1:
                    out = tf.nn.relu(out)
            logit += tf.reshape(out, [-1])
        return {"scores": tf.reshape(tf.sigmoid(logit), [-1, 1])}

    @tf.function(input_signature=[tf.TensorSpec([None], dtype, name=name) for name, dtype in FEATURES.items()])
    def serve_raw(self, trip_miles, trip_seconds, payment_type):
        return self._score(trip_miles, trip_seconds, payment_type)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(self, examples):
        spec = {name: tf.io.FixedLenFeature([], dtype) for name, dtype in FEATURES.items()}
        parsed = tf.io.parse_example(examples, spec)
        return self._score(**parsed)


def expected_score(trip_miles: float, payment_type: str, bias: float) -> float:
    """The score the demo model (with no hidden units) gives one row."""
    logit = 0.1 * trip_miles - (1.0 if payment_type == "Cash" else 0.0) + bias
    return float(1.0 / (1.0 + np.exp(-np.float32(logit))))


def write_demo_model(export_dir: str, bias: float = 0.0, hidden_units: tuple[int, ...] = ()) -> str:
    """Write the demo SavedModel to `export_dir` (a version directory such as `<base>/1`)."""
    module = _DemoModel(bias, hidden_units)
    os.makedirs(os.path.dirname(os.path.abspath(export_dir)), exist_ok=True)
    tf.saved_model.save(
        module,
        export_dir,
        signatures={"serving_default": module.serve_raw, "from_examples": module.serve_examples},
    )
    return export_dir
