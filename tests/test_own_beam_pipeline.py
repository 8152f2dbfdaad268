"""The README's "own Beam pipeline" example runs as written, on the repo's penguin data."""

from __future__ import annotations

from tests.conftest import PENGUIN_CSV


def test_the_transforms_run_in_a_plain_beam_pipeline(tmp_path, capsys):
    import tensorflow_data_validation as tfdv
    import tensorflow_transform as tft

    from examples.own_beam_pipeline.pipeline import run

    run(PENGUIN_CSV, str(tmp_path))
    stats = tfdv.load_stats_text(str(tmp_path / "train_stats.pbtxt"))
    assert stats.datasets[0].name == "train" and stats.datasets[0].num_examples == 250
    output = tft.TFTransformOutput(str(tmp_path / "transform_fn"))
    assert set(output.transformed_feature_spec()) == {"culmen_z", "species"}
    assert "eval rows transformed: 84" in capsys.readouterr().out
