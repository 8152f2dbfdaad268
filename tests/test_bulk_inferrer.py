"""BulkInferrer in the taxi pipeline: predictions as Parquet, equal to the model's own, and none when not blessed."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from beam_pipeline.errors import PipelineDefinitionError
from tests.helpers import run_components, store_at
from tests.test_trainer import taxi_trainer_components
from tests.test_transform import taxi_sample
from transforms import evaluator as ev
from transforms.bulk_inferrer import BulkInferrer

LABEL = "tips_xf"


def _components(data: str) -> list:
    components = taxi_trainer_components(data, train_steps=20)
    gen, trainer = components[0], components[-1]
    lenient = ev.Evaluator(
        examples=gen.outputs.examples,
        model=trainer.outputs.model,
        eval_config=ev.binary_classification_eval_config(LABEL, lower_bounds={"example_count": 1}),
        component_id="Lenient",
    )
    strict = ev.Evaluator(
        examples=gen.outputs.examples,
        model=trainer.outputs.model,
        eval_config=ev.binary_classification_eval_config(LABEL, lower_bounds={"auc": 0.9999}),
        component_id="Strict",
    )
    inferred = BulkInferrer(
        examples=gen.outputs.examples,
        model=trainer.outputs.model,
        model_blessing=lenient.outputs.blessing,
        splits=["eval"],
        component_id="Inferred",
    )
    refused = BulkInferrer(
        examples=gen.outputs.examples,
        model=trainer.outputs.model,
        model_blessing=strict.outputs.blessing,
        component_id="Refused",
    )
    return [*components, lenient, strict, inferred, refused]


def _serving_default(model, table) -> np.ndarray:
    """The model's scores from its raw-feature signature, fed column by column (missing: NaN, -1, "")."""
    fn = model.signatures["serving_default"]
    feeds = {}
    for name, spec in fn.structured_input_signature[1].items():
        missing = {tf.string: b"", tf.float32: np.nan, tf.float64: np.nan}.get(spec.dtype, -1)
        values = [v[0] if v else missing for v in table.column(name).to_pylist()]
        feeds[name] = tf.constant(values, dtype=spec.dtype)
    return fn(**feeds)["scores"].numpy().reshape(-1)


@pytest.mark.slow
def test_bulk_predictions_equal_the_models_own_and_a_model_not_blessed_predicts_nothing(tmp_path):
    data = taxi_sample(str(tmp_path / "taxi.csv"), 600)
    result = run_components(tmp_path / "root", _components(data), name="bulk")
    assert result.artifact("Lenient", "blessing").properties["blessed"] == 1
    assert result.artifact("Strict", "blessing").properties["blessed"] == 0

    inferred = result.artifact("Inferred", "inference_result")
    assert inferred.properties["skipped"] == 0 and inferred.split_names == ["eval"]
    table = pq.read_table(sorted(glob.glob(os.path.join(inferred.split_uri("eval"), "*.parquet"))))
    assert table.num_rows == result.artifact("ExampleGen", "examples").properties["row_counts"]["eval"]
    scores = np.array([s[0] for s in table.column("scores").to_pylist()], np.float32)
    assert ((scores >= 0) & (scores <= 1)).all()
    model = tf.saved_model.load(os.path.join(result.artifact("Trainer", "model").uri, "Format-Serving"))
    np.testing.assert_allclose(scores, _serving_default(model, table), rtol=1e-5, atol=1e-6)

    refused = result.artifact("Refused", "inference_result")
    assert refused.properties["skipped"] == 1 and refused.split_names == []
    assert "is not blessed" in refused.properties["skip_reason"] and "auc" in refused.properties["skip_reason"]
    store = store_at(tmp_path / "root")
    inputs, _ = store.execution_artifacts(result.components["Inferred"].execution_id)
    assert {name: [a.id for a in arts] for name, arts in inputs.items()} == {
        "examples": [result.artifact("ExampleGen", "examples").id],
        "model": [result.artifact("Trainer", "model").id],
        "model_blessing": [result.artifact("Lenient", "blessing").id],
    }


def test_unknown_splits_are_refused_before_anything_runs(tmp_path):
    components = taxi_trainer_components(taxi_sample(str(tmp_path / "taxi.csv"), 50))
    bulk = BulkInferrer(examples=components[0].outputs.examples, model=components[-1].outputs.model, splits=["test"])
    with pytest.raises(PipelineDefinitionError, match=r"splits \['test'\] are not in the examples' splits"):
        run_components(tmp_path / "root", [*components, bulk])
