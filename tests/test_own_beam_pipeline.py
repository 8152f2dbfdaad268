"""The README's "own Beam pipeline" example runs as written, on the repo's penguin data."""

from __future__ import annotations

from tests.conftest import PENGUIN_CSV


def test_the_transforms_run_in_a_plain_beam_pipeline(tmp_path, capsys):
    import tensorflow_data_validation as tfdv
    import tensorflow_transform as tft

    from examples.own_beam_pipeline.pipeline import run

    run(PENGUIN_CSV, str(tmp_path))
    stats = tfdv.load_stats_text(str(tmp_path / "train_stats.pbtxt"))
    train_rows = stats.datasets[0].num_examples
    assert stats.datasets[0].name == "train" and 200 < train_rows < 300  # 3 of 4 of the 334 rows, by hash
    output = tft.TFTransformOutput(str(tmp_path / "transform_fn"))
    assert set(output.transformed_feature_spec()) == {"culmen_z", "species"}
    assert f"eval rows transformed: {334 - train_rows}" in capsys.readouterr().out
