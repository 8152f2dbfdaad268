"""The README's "own Beam pipeline" example runs as written, on the repo's penguin data."""

from __future__ import annotations

import numpy as np

from tests.conftest import PENGUIN_CSV


def test_the_transforms_run_in_a_plain_beam_pipeline(tmp_path, capsys):
    import tensorflow as tf
    import tensorflow_data_validation as tfdv
    import tensorflow_transform as tft

    from examples.own_beam_pipeline.penguin_model import FEATURES, LABEL
    from examples.own_beam_pipeline.pipeline import run

    run(PENGUIN_CSV, str(tmp_path))
    stats = tfdv.load_stats_text(str(tmp_path / "train_stats.pbtxt"))
    train_rows = stats.datasets[0].num_examples
    assert stats.datasets[0].name == "train" and 200 < train_rows < 300  # 3 of 4 of the 334 rows, by hash
    output = tft.TFTransformOutput(str(tmp_path / "transform_fn"))
    assert set(output.transformed_feature_spec()) == {*FEATURES, LABEL}
    assert f"pushed {tmp_path / 'model'} as {tmp_path / 'serving' / '1'}" in capsys.readouterr().out

    # The model TrainModel exported and PushModel pushed classifies the held-out split far better than chance (1/3).
    spec = output.transformed_feature_spec()
    files = tf.io.gfile.glob(str(tmp_path / "eval" / "*.gz"))
    rows = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    assert len(rows) == 334 - train_rows
    features = {name: np.array([[float(r[name])] for r in rows], np.float32) for name in FEATURES}
    labels = np.array([int(r[LABEL]) for r in rows])
    model = tf.keras.models.load_model(str(tmp_path / "serving" / "1"))  # what PushModel put in place
    accuracy = float(np.mean(np.argmax(model.predict(features, verbose=0), axis=1) == labels))
    assert accuracy > 0.7, accuracy
