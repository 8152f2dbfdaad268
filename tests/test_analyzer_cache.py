"""tf.Transform's analyzer cache over a rolling window: the rerun analyzes only the new span, with the same result."""

from __future__ import annotations

import glob
import os
import textwrap

import pytest

from tests.helpers import run_components
from tests.test_spans import _write_spans
from transforms.example_gen import ExampleGen, RangeConfig
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.transform import Transform

MODULE = textwrap.dedent(
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    def preprocessing_fn(inputs):
        culmen = tf.sparse.to_dense(inputs["culmen_length_mm"])[:, 0]
        mass = tf.sparse.to_dense(inputs["body_mass_g"])[:, 0]
        species = tf.strings.as_string(tf.sparse.to_dense(inputs["species"])[:, 0])
        return {
            "culmen_z": tft.scale_to_z_score(culmen),
            "mass_01": tft.scale_to_0_1(mass),
            "species_id": tft.compute_and_apply_vocabulary(species),
        }
    """
)


def _components(pattern: str, module: str, disable: bool = False) -> list:
    gen = ExampleGen(input_base=pattern, range_config=RangeConfig.rolling(2), splits={"train": 3, "eval": 1})
    stats = StatisticsGen(examples=gen.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    transform = Transform(
        examples=gen.outputs.examples, schema=schema.outputs.schema, module_file=module, disable_analyzer_cache=disable
    )
    return [gen, stats, schema, transform]


def _transformed(result, split: str) -> dict[str, list]:
    """Each transformed feature's values over a split's TFRecords, sorted."""
    import tensorflow as tf

    uri = result.artifact("Transform", "transformed_examples").uri
    files = sorted(glob.glob(os.path.join(uri, f"Split-{split}", "*.gz")))
    values: dict[str, list] = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.train.Example.FromString(record.numpy())
        for name, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            values.setdefault(name, []).extend(getattr(feature, kind).value)
    return {name: sorted(v) for name, v in values.items()}


@pytest.mark.slow
def test_a_window_rerun_analyzes_only_its_new_span_and_transforms_as_a_full_analysis_does(tmp_path):
    import numpy as np

    data, root = tmp_path / "data", tmp_path / "root"
    module = tmp_path / "prep.py"
    module.write_text(MODULE)
    _write_spans(data)
    pattern = str(data / "span-{SPAN}" / "*.csv")
    os.rename(data / "span-3", data / "later-3")

    first = run_components(root, _components(pattern, str(module)), name="cache")
    graph = first.artifact("Transform", "transform_graph")
    assert graph.properties["analyzer_cache"] is True and graph.properties["analyzer_cache_reused"] == []
    assert os.path.isdir(os.path.join(graph.uri, "analyzer_cache"))

    os.rename(data / "later-3", data / "span-3")
    window = run_components(root, _components(pattern, str(module)), name="cache")
    reused = window.artifact("Transform", "transform_graph").properties["analyzer_cache_reused"]
    assert [key.split("-")[:2] for key in reused] == [["train", "span2"]]  # span 3 alone was analyzed

    full = run_components(tmp_path / "full", _components(pattern, str(module), disable=True), name="cache")
    assert "analyzer_cache" not in full.artifact("Transform", "transform_graph").properties
    for split in ("train", "eval"):
        got, want = _transformed(window, split), _transformed(full, split)
        assert sorted(got) == sorted(want) == ["culmen_z", "mass_01", "species_id"]
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=f"{split}/{name}")

    # The same window again: nothing runs, the cache changes nothing in the key.
    again = run_components(root, _components(pattern, str(module)), name="cache")
    assert {c.state for c in again.components.values()} == {"CACHED"}
