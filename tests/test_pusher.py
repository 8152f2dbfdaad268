"""Pusher: blessed models become new integer versions under the serving dir, atomically; others never.

Everything runs on real pipeline runs (`launcher.run`) of the taxi example's components on a small
slice of its data: one module-scoped store holds a well-trained model and a deliberately weak one
(learning rate 0: its initial weights), judged by a value-threshold Evaluator ("Lenient", always
blessed) and a change-threshold one ("Guarded", which the weak model regresses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading

import pytest

from beam_pipeline import Pipeline, launcher
from beam_pipeline.errors import PipelineDefinitionError, PipelineRunError
from beam_pipeline.metadata import MetadataStore
from tests import _fixtures_metadata as fm
from tests.helpers import read_only_directory
from transforms import _push_record as pr
from transforms import push_model as pm
from transforms import pusher as pu
from transforms._push_record import TEMP_PREFIX
from transforms.evaluator import Evaluator, binary_classification_eval_config
from transforms.example_gen import ExampleGen
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen
from transforms.trainer import Trainer
from transforms.transform import Transform

ROWS = 600
GOOD = {"train_steps": 40}
WEAK = {"train_steps": 1, "hyperparameters": {"learning_rate": 0.0}}
PRE_EXISTING = ("3", "17", "notes", ".push-tmp-stale")  # in serving/numbered before the first push


def _components(data: str, trainer_args: dict) -> dict:
    example_gen = ExampleGen(input_base=data)
    statistics_gen = StatisticsGen(examples=example_gen.outputs.examples)
    schema_gen = SchemaGen(statistics=statistics_gen.outputs.statistics)
    transform = Transform(
        examples=example_gen.outputs.examples, schema=schema_gen.outputs.schema, module_file=fm.TAXI_MODULE
    )
    trainer = Trainer(
        examples=transform.outputs.transformed_examples,
        transform_graph=transform.outputs.transform_graph,
        schema=schema_gen.outputs.schema,
        module_file=fm.TAXI_MODULE,
        eval_steps=5,
        **trainer_args,
    )
    return {
        "upstream": [example_gen, statistics_gen, schema_gen, transform, trainer],
        "examples": example_gen.outputs.examples,
        "model": trainer.outputs.model,
    }


def _pipeline(base, trainer_args: dict) -> Pipeline:
    """Both Evaluators on one Trainer; Push and PushNumbered follow Lenient, PushGuarded follows Guarded."""
    c = _components(str(base / "data.csv"), trainer_args)
    lenient = Evaluator(
        examples=c["examples"],
        model=c["model"],
        eval_config=binary_classification_eval_config("tips_xf", lower_bounds={"example_count": 1}),
        component_id="Lenient",
    )
    guarded = Evaluator(
        examples=c["examples"],
        model=c["model"],
        eval_config=binary_classification_eval_config("tips_xf", max_regression={"auc": 0.1}),
        component_id="Guarded",
    )
    serving = base / "serving"
    pushers = [
        pu.Pusher(model=c["model"], blessing=lenient.outputs.blessing, serving_model_dir=str(serving / "main"),
                  component_id="Push"),
        pu.Pusher(model=c["model"], blessing=lenient.outputs.blessing, serving_model_dir=str(serving / "numbered"),
                  component_id="PushNumbered"),
        pu.Pusher(model=c["model"], blessing=guarded.outputs.blessing, serving_model_dir=str(serving / "guarded"),
                  component_id="PushGuarded"),
    ]  # fmt: skip
    return Pipeline("pusher_test", str(base / "root"), [*c["upstream"], lenient, guarded, *pushers])


def _run(base, trainer_args: dict) -> launcher.RunResult:
    return launcher.run(_pipeline(base, trainer_args), fm.BEAM_ARGS)


def _pushed(result: launcher.RunResult, pusher: str) -> dict:
    """The published properties of one Pusher, checked against its push_result.json."""
    artifact = result.artifact(pusher, "pushed_model")
    with open(os.path.join(artifact.uri, pu.RESULT_FILE)) as f:
        record = json.load(f)
    assert record["pushed"] == artifact.properties["pushed"] and record["model_uri"] == artifact.properties["model_uri"]
    return artifact.properties


def _tree(path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            full = os.path.join(dirpath, n)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def _saved_model(model_uri: str) -> str:
    return os.path.join(model_uri, pu.SERVING_MODEL_DIR)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run 1: the good model. Run 2: the weak one. Run 3: the good one again (everything reused upstream),
    after another run's push of the weak model landed in serving/guarded."""
    base = tmp_path_factory.mktemp("pusher")
    fm.sample_csv(str(base / "data.csv"), rows=ROWS)
    for name in PRE_EXISTING:
        (base / "serving" / "numbered" / name).mkdir(parents=True)
    first = _run(base, GOOD)
    second = _run(base, WEAK)
    good, weak = first.artifact("Trainer", "model").uri, second.artifact("Trainer", "model").uri
    # What another run of this pipeline would have done meanwhile: push the weak model to serving/guarded.
    racer = pm.push_model(_saved_model(weak), str(base / "serving" / "guarded"), record={"model_uri": weak})
    third = _run(base, GOOD)
    return {"base": base, "runs": [first, second, third], "good": good, "weak": weak, "racer": racer}


@pytest.mark.slow
def test_blessed_models_are_pushed_as_increasing_versions(runs):
    first, second, _ = runs["runs"]
    main = runs["base"] / "serving" / "main"
    props = _pushed(first, "Push")
    assert {k: props[k] for k in ("pushed", "pushed_version", "pushed_destination", "model_uri", "push_message")} == {
        "pushed": 1,
        "pushed_version": 1,
        "pushed_destination": str(main / "1"),
        "model_uri": runs["good"],
        "push_message": f"pushed model {runs['good']} as version 1 to {main / '1'}",
    }
    served = _tree(main / "1")
    record = json.loads(served.pop(pr.PUSH_RECORD))
    assert served == _tree(_saved_model(runs["good"]))  # the whole SavedModel, nothing else
    assert record["model_uri"] == runs["good"] and record["blessing_uri"] == first.artifact("Lenient", "blessing").uri
    assert record["pushed_by"] == f"pusher_test run {first.run_id}"

    assert _pushed(second, "Push")["pushed_version"] == 2  # value thresholds only: the weak model is blessed too
    assert pr.read_push_record(str(main / "2"))["model_uri"] == runs["weak"]
    assert not [n for n in os.listdir(main) if n.startswith(TEMP_PREFIX)]  # no temp directory left behind


@pytest.mark.slow
def test_version_is_one_above_the_highest_existing_version(runs):
    numbered = runs["base"] / "serving" / "numbered"
    versions = [_pushed(run, "PushNumbered")["pushed_version"] for run in runs["runs"]]
    assert versions == [18, 19, 20]  # 3 and 17 were there; "notes" and the stale temp dir do not count
    assert pm.existing_versions(str(numbered)) == [3, 17, 18, 19, 20]


@pytest.mark.slow
def test_model_that_is_not_blessed_is_not_pushed(runs):
    second = runs["runs"][1]
    blessing = second.artifact("Guarded", "blessing")
    assert blessing.properties["blessed"] == 0
    assert blessing.properties["baseline_model_uri"] == runs["good"]
    props = _pushed(second, "PushGuarded")
    assert props["pushed"] == 0 and "pushed_version" not in props and "pushed_destination" not in props
    guarded = runs["base"] / "serving" / "guarded"
    assert props["push_message"].startswith(f"model {runs['weak']} is not blessed; nothing pushed to {guarded}")
    assert "auc on slice Overall" in props["push_message"]  # the Evaluator's reason
    assert pm.existing_versions(str(guarded)) == [1, 2]  # 1 from run 1, 2 the racer's push


@pytest.mark.slow
def test_guarded_push_over_a_model_it_was_never_judged_against_is_refused(runs):
    """The weak model landed in serving/guarded after run 3 resolved its baseline: run 3 must not push over it."""
    third = runs["runs"][2]
    version, destination = runs["racer"]
    assert third.artifact("Guarded", "blessing").properties["blessed"] == 1
    props = _pushed(third, "PushGuarded")
    assert props["pushed"] == 0 and props["push_refused"] == 1
    assert props["served_version"] == version and props["served_model_uri"] == runs["weak"]
    assert props["blessing_uri"] == third.artifact("Guarded", "blessing").uri
    winner = f"version {version} (model {runs['weak']})"
    assert props["push_message"].startswith(f"model {runs['good']} not pushed: {winner} won")
    assert "were never compared" in props["push_message"]
    assert pm.existing_versions(os.path.dirname(destination)) == [1, version]


@pytest.mark.slow
def test_rerun_with_the_model_already_served_does_not_copy_it_again(runs):
    main = runs["base"] / "serving" / "main"
    third = runs["runs"][2]
    # Run 2 made the weak model newest; value thresholds only, so the good one is pushed again to be newest.
    assert _pushed(third, "Push")["pushed_version"] == 3
    assert pr.read_push_record(str(main / "3"))["model_uri"] == runs["good"]

    (main / "0").mkdir()  # the versions changed, so the Pusher runs again, and finds its model newest
    again = _run(runs["base"], GOOD)
    props = _pushed(again, "Push")
    assert again.components["Push"].state == "COMPLETE" and again.components["Trainer"].state == "CACHED"
    assert (props["pushed"], props["pushed_version"]) == (1, 3)
    assert props["push_message"] == f"model {runs['good']} is already version 3 at {main / '3'}; not copied again"
    assert sorted(os.listdir(main)) == sorted(["0", "1", "2", "3", pm.LOCK_FILE])


@pytest.mark.slow
def test_resolve_reads_past_pushes_and_the_blessings_baselines(runs):
    store = MetadataStore(runs["runs"][0].metadata_uri)
    pipeline = _pipeline(runs["base"], GOOD)
    by_id = {c.id: c for c in pipeline.components}
    serving = runs["base"] / "serving"
    resolved = by_id["PushGuarded"].resolve(store, "pusher_test")
    assert resolved["known_pushes"] == {str(serving / "guarded" / "1"): runs["good"]}  # the racer is not in it
    edges: dict[str, set[str]] = {}
    for run in runs["runs"]:
        props = run.artifact("Guarded", "blessing").properties
        if props["blessed"] == 1 and props.get("baseline_model_uri"):
            edges.setdefault(props["model_uri"], set()).add(props["baseline_model_uri"])
    assert resolved["baselines"] == {uri: sorted(bases) for uri, bases in edges.items()}
    lenient = by_id["Push"].resolve(store, "pusher_test")
    assert "baselines" not in lenient  # value thresholds: blessings are not relative to another model
    assert lenient["known_pushes"][str(serving / "main" / "3")] == runs["good"]
    assert lenient["known_pushes"][str(serving / "main" / "2")] == runs["weak"]


# -- the compare-and-set itself ---------------------------------------------------------------------------
@pytest.mark.slow
def test_guarded_push_lands_only_over_a_model_it_was_judged_against(runs, tmp_path):
    good, weak = runs["good"], runs["weak"]
    serving = str(tmp_path / "serving")
    first = pr.Guard(good, None, frozenset())
    assert pm.push_model(_saved_model(good), serving, record={"model_uri": good}, guard=first)[0] == 1
    judged_against_good = pr.Guard(weak, good, pr.judged_against(good, {}))
    assert pm.push_model(_saved_model(weak), serving, record={"model_uri": weak}, guard=judged_against_good)[0] == 2

    # Judged against the good model too, but the weak one is served now: refused, naming the winner.
    late = pr.Guard("/models/late", good, frozenset({good}))
    with pytest.raises(pr.PushRefused, match=re.escape(f"version 2 (model {weak})")) as refused:
        pm.push_model(_saved_model(good), serving, record={"model_uri": "/models/late"}, guard=late)
    assert refused.value.served == pr.Served(2, os.path.join(serving, "2"), weak)
    assert f"judged against baseline {good}" in str(refused.value)
    assert sorted(os.listdir(serving)) == sorted(["1", "2", pm.LOCK_FILE])  # nothing copied, nothing left behind

    # A chain of blessings counts: late <- weak <- good.
    chained = pr.Guard("/models/late", "/models/mid", pr.judged_against("/models/mid", {"/models/mid": [weak]}))
    assert pm.push_model(_saved_model(good), serving, record={"model_uri": "/models/late"}, guard=chained)[0] == 3


@pytest.mark.slow
def test_a_push_that_lands_during_the_copy_is_seen_under_the_lock(runs, tmp_path, monkeypatch):
    good, weak = runs["good"], runs["weak"]
    serving = str(tmp_path / "serving")
    pm.push_model(_saved_model(good), serving, record={"model_uri": good})
    real_copy = pm._copy_tree

    def copy_while_another_run_pushes(src, dst):
        real_copy(src, dst)
        if src == _saved_model(good):  # the guarded push: another run's push lands while it copies
            pm.push_model(_saved_model(weak), serving, record={"model_uri": weak})

    monkeypatch.setattr(pm, "_copy_tree", copy_while_another_run_pushes)
    guard = pr.Guard("/models/candidate", good, frozenset({good}))  # passes the early check: good is newest
    with pytest.raises(pr.PushRefused, match=re.escape(f"version 2 (model {weak})")):
        pm.push_model(_saved_model(good), serving, record={"model_uri": "/models/candidate"}, guard=guard)
    assert pm.existing_versions(serving) == [1, 2]
    assert pr.read_push_record(os.path.join(serving, "2"))["model_uri"] == weak
    assert not [n for n in os.listdir(serving) if n.startswith(TEMP_PREFIX)]


@pytest.mark.slow
def test_a_version_without_push_record_is_not_shadowed_by_a_guarded_push(runs, tmp_path):
    good, weak = runs["good"], runs["weak"]
    serving = tmp_path / "serving"
    shutil.copytree(_saved_model(good), serving / "1")  # pushed by hand, or by a Pusher before push records
    guard = pr.Guard(weak, good, frozenset({good}))
    with pytest.raises(pr.PushRefused, match=r"version 1 \(a model no push record names\)"):
        pm.push_model(_saved_model(weak), str(serving), record={"model_uri": weak}, guard=guard)
    # This Pusher's PushedModel records in ML Metadata say which model that version is.
    known = {str(serving / "1"): good}
    assert pm.push_model(_saved_model(weak), str(serving), record={"model_uri": weak}, guard=guard,
                         known_pushes=known)[0] == 2  # fmt: skip


@pytest.mark.slow
def test_push_waits_for_the_lock_and_names_its_holder(runs, tmp_path):
    serving = str(tmp_path / "serving")
    os.makedirs(serving)
    source = _saved_model(runs["good"])
    with pm.serving_lock(serving):
        with pytest.raises(PipelineRunError, match=rf"another push has held .*\.push\.lock .*pid {os.getpid()} on"):
            pm.push_model(source, serving, record={"model_uri": runs["good"]}, lock_timeout_s=0.2)
        assert os.listdir(serving) == [pm.LOCK_FILE]  # its copy was removed

        done: list[tuple[int, str]] = []
        waiter = threading.Thread(target=lambda: done.append(pm.push_model(source, serving)))
        waiter.start()
    waiter.join(timeout=600)  # released: the waiting push goes through
    assert done == [(1, os.path.join(serving, "1"))]


def test_judged_against_follows_baselines_and_stops_on_cycles():
    baselines = {"c": ["b"], "b": ["a", "b"], "a": ["c"], "x": ["y"]}
    assert pr.judged_against("c", baselines) == frozenset({"a", "b", "c"})
    assert pr.judged_against(None, baselines) == frozenset()


# -- versions, temp dirs and bad destinations --------------------------------------------------------------
@pytest.mark.slow
def test_version_taken_by_a_racing_push_moves_to_the_next_number(runs, tmp_path, monkeypatch):
    """A push outside the lock (by hand, an older Pusher) takes the number between listing and rename."""
    serving = tmp_path / "serving"
    shutil.copytree(_saved_model(runs["weak"]), serving / "1")
    listings = iter([[], [1]])  # the first listing was taken before the other push landed
    monkeypatch.setattr(pm, "existing_versions", lambda _: next(listings))
    assert pm.push_model(_saved_model(runs["good"]), str(serving))[0] == 2
    assert _tree(serving / "1") == _tree(_saved_model(runs["weak"]))  # the other push is untouched
    assert sorted(os.listdir(serving)) == sorted(["1", "2", pm.LOCK_FILE])


@pytest.mark.slow
def test_empty_model_directory_fails_and_leaves_no_temp_dir(tmp_path):
    serving = tmp_path / "serving"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineDefinitionError, match="is empty or missing: nothing to push"):
        pm.push_model(str(tmp_path / "empty"), str(serving))
    assert os.listdir(serving) == []


def _pipeline_with_pusher(base, serving_dir: str) -> Pipeline:
    c = _components(fm.sample_csv(str(base / "data.csv"), rows=50), GOOD)
    evaluator = Evaluator(
        examples=c["examples"],
        model=c["model"],
        eval_config=binary_classification_eval_config("tips_xf", lower_bounds={"example_count": 1}),
    )
    pusher = pu.Pusher(model=c["model"], blessing=evaluator.outputs.blessing, serving_model_dir=serving_dir)
    return Pipeline("unpushable", str(base / "root"), [*c["upstream"], evaluator, pusher])


def test_serving_dir_under_a_file_fails_the_run_before_anything_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    serving = blocker / "models" / "taxi"
    with pytest.raises(PipelineDefinitionError, match=re.escape(f"serving_model_dir '{serving}' is not writable")):
        launcher.run(_pipeline_with_pusher(tmp_path, str(serving)), fm.BEAM_ARGS)
    assert not (tmp_path / "root" / "Trainer").exists()  # no training was spent on it
    with pytest.raises(PipelineDefinitionError, match=re.escape(f"'{serving}' is not writable")):
        pm.push_model(str(tmp_path), str(serving))


def test_read_only_serving_dir_is_not_writable(tmp_path):
    serving = tmp_path / "serving"
    serving.mkdir()
    with (
        read_only_directory(str(serving)),
        pytest.raises(PipelineDefinitionError, match=re.escape(f"'{serving}' is not writable")),
    ):
        launcher.run(_pipeline_with_pusher(tmp_path, str(serving)), fm.BEAM_ARGS)


def test_serving_dir_that_does_not_exist_yet_is_fine(tmp_path):
    pusher = _pipeline_with_pusher(tmp_path, str(tmp_path / "a" / "b")).components[-1]
    assert pusher.static_outputs({}) == {"pushed_model": {}}
    assert not (tmp_path / "a").exists()  # the check leaves nothing behind


def test_cache_key_follows_the_versions_in_the_serving_dir(tmp_path):
    pusher = _pipeline_with_pusher(tmp_path, str(tmp_path / "serving")).components[-1]
    empty = pusher.external_fingerprint()
    (tmp_path / "serving" / "1").mkdir(parents=True)
    (tmp_path / "serving" / ".tmp-push").mkdir()
    (tmp_path / "serving" / pm.LOCK_FILE).touch()
    one = pusher.external_fingerprint()
    assert one != empty  # a version appeared: a cached push is no longer trusted
    assert pusher.external_fingerprint() == one  # temp dirs and the lock file do not count


def test_unsupported_or_missing_serving_dir_is_rejected(tmp_path):
    for uri in ("hdfs://namenode/models", "file:///tmp/models"):
        with pytest.raises(PipelineDefinitionError, match=r"supported are local directories and s3://, gs://"):
            _pipeline_with_pusher(tmp_path, uri)
    pusher = _pipeline_with_pusher(tmp_path, "gs://bucket/models/taxi/").components[-1]
    assert pusher.params["serving_model_dir"] == "gs://bucket/models/taxi"
    with pytest.raises(PipelineDefinitionError, match="needs serving_model_dir"):
        _pipeline_with_pusher(tmp_path, "")


def test_pusher_wired_to_another_model_than_its_evaluator_is_rejected(tmp_path):
    c = _components(fm.sample_csv(str(tmp_path / "data.csv"), rows=50), GOOD)
    other = Trainer(
        examples=c["upstream"][3].outputs.transformed_examples,
        transform_graph=c["upstream"][3].outputs.transform_graph,
        module_file=fm.TAXI_MODULE,
        train_steps=2,
        component_id="OtherTrainer",
    )
    evaluator = Evaluator(
        examples=c["examples"],
        model=c["model"],
        eval_config=binary_classification_eval_config("tips_xf", lower_bounds={"example_count": 1}),
    )
    with pytest.raises(PipelineDefinitionError, match=r"judges Channel\(Trainer\.outputs\.model.*OtherTrainer"):
        pu.Pusher(model=other.outputs.model, blessing=evaluator.outputs.blessing, serving_model_dir=str(tmp_path))


@pytest.mark.slow
def test_blessing_of_another_model_is_refused_when_the_push_runs(runs, tmp_path):
    first, second, _ = runs["runs"]
    push = pu._Push(str(tmp_path / "serving"), str(tmp_path / "out"), pushed_by="test", known_pushes={},
                    baselines=None)  # fmt: skip
    with pytest.raises(PipelineDefinitionError, match=re.escape(f"is for model '{runs['good']}', not for")):
        push(first.artifact("Lenient", "blessing"), second.artifact("Trainer", "model"))


@pytest.mark.slow
def test_push_model_in_a_bare_beam_pipeline_gives_each_model_its_own_version(runs, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    serving = tmp_path / "serving"
    models = [_saved_model(runs["good"]), _saved_model(runs["weak"])]
    with beam.Pipeline() as p:
        pushed = p | beam.Create(models) | pm.PushModel(str(serving))
        versions = pushed | beam.Map(
            lambda r: (r["model_dir"], r["pushed_destination"].endswith(str(r["pushed_version"])))
        )
        assert_that(versions, equal_to([(m, True) for m in models]))
    assert sorted(n for n in os.listdir(serving) if n.isdigit()) == ["1", "2"]
    by_model = {pr.read_push_record(str(serving / v))["model_uri"]: v for v in ("1", "2")}
    assert set(by_model) == set(models)
    for model, version in by_model.items():
        served = _tree(serving / version)
        served.pop(pr.PUSH_RECORD)
        assert served == _tree(model)  # the whole SavedModel, under a version of its own


def test_push_model_refuses_a_destination_it_cannot_push_to_atomically():
    with pytest.raises(PipelineDefinitionError, match="needs serving_model_dir"):
        pm.PushModel("")
    with pytest.raises(PipelineDefinitionError, match="supported are local directories"):
        pm.PushModel("hdfs://namenode/models/taxi")
