"""Cond: a push that runs only when the model is blessed, skipped and recorded as such when it is not."""

from __future__ import annotations

import os

import pytest
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline.conditions import Cond
from beam_pipeline.errors import PipelineDefinitionError
from tests.helpers import run_components, store_at
from tests.test_trainer import taxi_trainer_components
from tests.test_transform import taxi_sample
from transforms import evaluator as ev
from transforms.pusher import Pusher

LABEL = "tips_xf"


def _components(data: str, serving) -> list:
    components = taxi_trainer_components(data, train_steps=20)
    gen, trainer = components[0], components[-1]
    judged = {}
    for name, bounds in (("Lenient", {"example_count": 1}), ("Strict", {"auc": 0.9999})):
        judged[name] = ev.Evaluator(
            examples=gen.outputs.examples,
            model=trainer.outputs.model,
            eval_config=ev.binary_classification_eval_config(LABEL, lower_bounds=bounds),
            component_id=name,
        )
    pushers = []
    for name, evaluator in judged.items():
        with Cond(evaluator.outputs.blessing.property("blessed") == 1):
            pushers.append(
                Pusher(
                    model=trainer.outputs.model,
                    blessing=evaluator.outputs.blessing,
                    serving_model_dir=str(serving / name),
                    component_id=f"PushIf{name}",
                )
            )
    return [*components, *judged.values(), *pushers]


@pytest.mark.slow
def test_a_conditional_push_runs_when_blessed_and_is_skipped_and_recorded_when_not(tmp_path):
    data, serving, root = taxi_sample(str(tmp_path / "taxi.csv"), 600), tmp_path / "serving", tmp_path / "root"
    result = run_components(root, _components(data, serving), name="cond")
    assert result.components["PushIfLenient"].state == "COMPLETE"
    assert result.artifact("PushIfLenient", "pushed_model").properties["pushed"] == 1
    assert os.path.exists(serving / "Lenient" / "1" / "saved_model.pb")
    skipped = result.components["PushIfStrict"]
    assert skipped.state == "SKIPPED" and skipped.artifacts == {}
    assert not os.path.exists(serving / "Strict")

    store = store_at(root)
    [execution] = store.mlmd.get_executions_by_id([skipped.execution_id])
    assert execution.last_known_state == mlmd_pb2.Execution.CANCELED
    reason = execution.custom_properties["error"].string_value
    assert reason == "skipped: condition Strict.blessing.blessed == 1 does not hold"
    # One run: every execution of it, from both jobs, is in the same run context.
    run_ctx = store.mlmd.get_context_by_type_and_name("pipeline_run", f"cond.{result.run_id}")
    in_run = {e.properties["component_id"].string_value for e in store.mlmd.get_executions_by_context(run_ctx.id)}
    assert in_run == set(result.components)

    again = run_components(root, _components(data, serving), name="cond")
    assert again.components["PushIfStrict"].state == "SKIPPED"
    assert {c.state for n, c in again.components.items() if n != "PushIfStrict"} == {"CACHED"}


def test_a_condition_needs_a_comparison_and_an_unconditional_producer(tmp_path):
    components = taxi_trainer_components(taxi_sample(str(tmp_path / "taxi.csv"), 50))
    with pytest.raises(PipelineDefinitionError, match="Cond needs a comparison"):
        Cond(components[-1].outputs.model)
    trainer = components[-1]
    with Cond(trainer.outputs.model.property("serving_dir") == "Format-Serving"):
        evaluator = ev.Evaluator(
            examples=components[0].outputs.examples,
            model=trainer.outputs.model,
            eval_config=ev.binary_classification_eval_config(LABEL, lower_bounds={"auc": 0.5}),
        )
    with Cond(evaluator.outputs.blessing.property("blessed") == 1):
        pusher = Pusher(model=trainer.outputs.model, blessing=evaluator.outputs.blessing,
                        serving_model_dir=str(tmp_path / "s"))  # fmt: skip
    assert evaluator.conditions and pusher.conditions and not trainer.conditions
    with pytest.raises(PipelineDefinitionError, match="which is itself conditional"):
        run_components(tmp_path / "root", [*components, evaluator, pusher])
