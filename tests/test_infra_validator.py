"""InfraValidator: the candidate served by `beam-pipeline serve` in a subprocess, sent real eval rows, before a push."""

from __future__ import annotations

import os

import pytest

from beam_pipeline.artifacts import MODEL_BLESSING, Artifact
from beam_pipeline.errors import PipelineDefinitionError
from tests.helpers import run_components
from tests.test_trainer import taxi_trainer_components
from tests.test_transform import taxi_components, taxi_sample, write_module
from transforms import evaluator as ev
from transforms import pusher as pu
from transforms.infra_validator import INFRA_BLESSED_FILE, INFRA_NOT_BLESSED_FILE, InfraValidator
from transforms.trainer import Trainer

# A model whose signature cannot serve the data: it requires a feature no row has.
UNSERVABLE = """
import tensorflow as tf


class _Model(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def from_examples(self, examples):
        parsed = tf.io.parse_example(examples, {"not_in_data": tf.io.FixedLenFeature([], tf.float32)})
        return {"scores": parsed["not_in_data"]}


def run_fn(fn_args):
    model = _Model()
    tf.saved_model.save(model, fn_args.serving_model_dir, signatures={"from_examples": model.from_examples})
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return taxi_sample(str(tmp_path_factory.mktemp("infra") / "taxi.csv"), 600)


@pytest.mark.slow
def test_a_servable_model_is_infra_blessed_and_pushed(tmp_path, data):
    components = taxi_trainer_components(data, train_steps=20)
    gen, trainer = components[0], components[-1]
    infra = InfraValidator(model=trainer.outputs.model, examples=gen.outputs.examples, num_examples=8)
    evaluator = ev.Evaluator(
        examples=gen.outputs.examples,
        model=trainer.outputs.model,
        eval_config=ev.binary_classification_eval_config("tips_xf", lower_bounds={"example_count": 1}),
    )
    serving = tmp_path / "serving"
    pusher = pu.Pusher(
        model=trainer.outputs.model,
        blessing=evaluator.outputs.blessing,
        infra_blessing=infra.outputs.blessing,
        serving_model_dir=str(serving),
    )
    result = run_components(tmp_path / "root", [*components, infra, evaluator, pusher], name="infra")
    blessing = result.artifact("InfraValidator", "blessing")
    assert blessing.properties["infra_blessed"] == 1, blessing.properties["infra_message"]
    assert "answered 8 rows of signature from_examples" in blessing.properties["infra_message"]
    assert os.path.exists(os.path.join(blessing.uri, INFRA_BLESSED_FILE))
    assert result.artifact("Pusher", "pushed_model").properties["pushed"] == 1
    assert os.path.exists(serving / "1" / "saved_model.pb")


@pytest.mark.slow
def test_a_model_whose_signature_cannot_serve_is_refused_and_not_pushed(tmp_path, data):
    module = write_module(str(tmp_path), UNSERVABLE, "unservable.py")
    components = taxi_components(data)
    transform = components[-1]
    trainer = Trainer(
        examples=transform.outputs.transformed_examples,
        transform_graph=transform.outputs.transform_graph,
        module_file=module,
    )
    infra = InfraValidator(model=trainer.outputs.model, examples=components[0].outputs.examples)
    result = run_components(tmp_path / "root", [*components, trainer, infra], name="unservable")
    blessing = result.artifact("InfraValidator", "blessing")
    message = blessing.properties["infra_message"]
    assert blessing.properties["infra_blessed"] == 0
    assert "HTTP 400" in message and "not_in_data" in message, message
    with open(os.path.join(blessing.uri, INFRA_NOT_BLESSED_FILE)) as f:
        assert "not_in_data" in f.read()

    # The Pusher's rule: a blessed model that failed infra validation is not pushed, and it says why.
    model = result.artifact("Trainer", "model")
    blessed = Artifact(MODEL_BLESSING, str(tmp_path / "b"), {"blessed": 1, "model_uri": model.uri})
    push = pu._Push(str(tmp_path / "serving"), str(tmp_path / "result"), pushed_by="t", known_pushes={}, baselines=None)
    outcome = push(blessed, model, blessing)
    assert outcome["pushed"] == 0 and "failed infra validation" in outcome["push_message"]
    assert not os.path.exists(tmp_path / "serving" / "1")


def test_bad_infra_validator_settings_are_refused(data):
    components = taxi_trainer_components(data)
    with pytest.raises(PipelineDefinitionError, match="send at least one row"):
        InfraValidator(model=components[-1].outputs.model, examples=components[0].outputs.examples, num_examples=0)
