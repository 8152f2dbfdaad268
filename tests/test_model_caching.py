"""Caching on the model half of the taxi pipeline: what re-runs Transform, Trainer, Evaluator and Pusher.

One base run (1,500 rows, 20 train steps) is shared by every test. Each test then runs the pipeline
again from a snapshot of it: a copy of the base run's ML Metadata (in a fresh pipeline root) and of
its serving directory, so no test sees another test's executions, blessings or pushes. The data and
module files keep their paths (a path is configuration, so a new path would re-run by itself); a test
that edits one restores it afterwards, and so does the one test that changes the base serving
directory.

The Transform and the Trainer read two copies of `taxi_utils.py` here, so that editing the trainer's
copy can show Transform staying cached. `create_pipeline` gives both the same file, and a module
file's whole content is in the cache key: there, any edit re-runs Transform
(`test_one_module_file_for_both_means_any_edit_reruns_transform`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from beam_pipeline import Pipeline, caching, launcher, staging
from beam_pipeline.launcher import RunResult
from beam_pipeline.metadata import MetadataStore
from examples.chicago_taxi.pipeline import MODULE_FILE, create_pipeline
from transforms.evaluator import Evaluator, binary_classification_eval_config
from transforms.pusher import Pusher
from transforms.trainer import Trainer

pytestmark = pytest.mark.slow

TRAIN_STEPS = 20
DATA_HALF = ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator")
MODEL_HALF = ("Transform", "Trainer", "Evaluator", "Pusher")


def taxi_pipeline(
    root: str | os.PathLike,
    data: str | os.PathLike,
    serving_dir: str | os.PathLike,
    module_file: str | os.PathLike = MODULE_FILE,
    *,
    trainer_module_file: str | os.PathLike | None = None,
    train_steps: int = TRAIN_STEPS,
    max_regression: dict[str, float] | None = None,
) -> Pipeline:
    """`create_pipeline`'s taxi pipeline with an Evaluator that a small, briefly trained model passes.

    create_pipeline's thresholds (auc >= 0.85, binary_accuracy >= 0.7) hold on every trip_start_hour
    slice; a 20-step model on 1,500 rows does not reach them, and an hour slice of a ~500-row eval
    split can hold one class only (AUC 0). Here the model must beat chance overall (auc >= 0.5),
    plus create_pipeline's regression check against the last blessed model when `max_regression` is
    given. `trainer_module_file` gives the Trainer its own module (same settings otherwise).
    """
    pipeline = create_pipeline(
        pipeline_root=str(root),
        data_path=str(data),
        train_steps=train_steps,
        serving_model_dir=str(serving_dir),
        module_file=str(module_file),
    )
    head = [pipeline.component(cid) for cid in (*DATA_HALF, "Transform")]
    trainer = pipeline.component("Trainer")
    if trainer_module_file is not None:
        transform, schema_gen = pipeline.component("Transform"), pipeline.component("SchemaGen")
        trainer = Trainer(
            examples=transform.outputs.transformed_examples,
            transform_graph=transform.outputs.transform_graph,
            schema=schema_gen.outputs.schema,
            module_file=str(trainer_module_file),
            train_steps=train_steps,
            eval_steps=trainer.params["eval_steps"],
        )
    evaluator = Evaluator(
        examples=pipeline.component("ExampleGen").outputs.examples,
        model=trainer.outputs.model,
        eval_config=binary_classification_eval_config(
            "tips_xf", lower_bounds={"auc": 0.5}, max_regression=max_regression
        ),
    )
    pusher = Pusher(
        model=trainer.outputs.model, blessing=evaluator.outputs.blessing, serving_model_dir=str(serving_dir)
    )
    return Pipeline(pipeline.name, pipeline.root, [*head, trainer, evaluator, pusher])


def states(result: RunResult) -> dict[str, str]:
    return {c.id: c.state for c in result.components.values()}


@contextlib.contextmanager
def edited(path: Path, old: str, new: str) -> Iterator[None]:
    """Replace `old` by `new` in the file for the duration of the block."""
    original = path.read_text()
    assert original.count(old) == 1, f"{old!r} is not in {path} exactly once"
    path.write_text(original.replace(old, new))
    try:
        yield
    finally:
        path.write_text(original)


@dataclasses.dataclass
class Base:
    data: Path
    transform_module: Path
    trainer_module: Path
    root: Path
    serving: Path
    result: RunResult


@pytest.fixture(scope="module")
def base(tmp_path_factory, taxi_small_csv) -> Base:
    """The first run: everything COMPLETE, the model blessed and pushed as version 1."""
    work = tmp_path_factory.mktemp("model_caching")
    (work / "in").mkdir()
    data = work / "in" / "data.csv"
    shutil.copy(taxi_small_csv, data)
    transform_module, trainer_module = work / "taxi_transform.py", work / "taxi_trainer.py"
    shutil.copy(MODULE_FILE, transform_module)
    shutil.copy(MODULE_FILE, trainer_module)
    root, serving = work / "root", work / "serving"
    result = launcher.run(
        taxi_pipeline(
            root,
            data,
            serving,
            transform_module,
            trainer_module_file=trainer_module,
            max_regression={"auc": 0.01},
        )
    )
    assert set(states(result).values()) == {"COMPLETE"}, states(result)
    pushed = result.artifact("Pusher", "pushed_model").properties
    assert (pushed["pushed"], pushed["pushed_version"]) == (1, 1), pushed
    return Base(data, transform_module, trainer_module, root, serving, result)


@pytest.fixture
def rerun(base: Base, tmp_path):
    """rerun(serving_dir=None, **changes) runs the base pipeline again, with `changes` to taxi_pipeline.

    It runs in a fresh root that starts with a copy of the base run's ML Metadata (shared by every
    call of one test). It pushes to a copy of the base serving directory made for the test, unless
    given `serving_dir`: the directory's path is Pusher configuration, so only the base run's own
    directory lets the Pusher be reused.
    """
    root, serving = tmp_path / "root", tmp_path / "serving"
    root.mkdir()
    shutil.copy(base.root / "metadata.sqlite", root / "metadata.sqlite")
    shutil.copytree(base.serving, serving)

    def run(serving_dir: Path = serving, **changes) -> RunResult:
        kwargs = {"trainer_module_file": base.trainer_module, "max_regression": {"auc": 0.01}, **changes}
        return launcher.run(taxi_pipeline(root, base.data, serving_dir, base.transform_module, **kwargs))

    return run


def artifact_ids(result: RunResult) -> dict[str, dict[str, int | None]]:
    return {c.id: {name: a.id for name, a in c.artifacts.items()} for c in result.components.values()}


def test_unchanged_pipeline_runs_nothing_and_pushes_no_new_version(base, rerun):
    """Nothing changed: every component is CACHED, Evaluator and Pusher included, and reuses the base
    run's artifacts; the serving directory still holds version 1 only.

    The Evaluator's baseline is now the model itself (blessed by the base run), which changes no
    decision and so does not count. The Pusher's cache key holds the versions in its directory.
    """
    result = rerun(serving_dir=base.serving)
    assert set(states(result).values()) == {"CACHED"}, states(result)
    assert artifact_ids(result) == artifact_ids(base.result)
    assert result.artifact("Pusher", "pushed_model").properties["pushed_version"] == 1
    assert sorted(os.listdir(base.serving)) == [".push.lock", "1"]  # the Pusher's lock file


def test_a_removed_version_is_pushed_again_without_retraining(base, rerun, tmp_path):
    """The serving directory lost the pushed version: only the Pusher runs, and pushes the same model."""
    aside = tmp_path / "version-1"
    os.rename(base.serving / "1", aside)
    try:
        result = rerun(serving_dir=base.serving)
        assert states(result) == {**dict.fromkeys((*DATA_HALF, *MODEL_HALF), "CACHED"), "Pusher": "COMPLETE"}
        pushed = result.artifact("Pusher", "pushed_model").properties
        assert pushed["model_uri"] == base.result.artifact("Trainer", "model").uri
        assert (pushed["pushed"], pushed["pushed_version"]) == (1, 1), pushed
        assert sorted(os.listdir(base.serving)) == [".push.lock", "1"]  # the Pusher's lock file
        assert sorted(os.listdir(base.serving / "1")) == sorted(os.listdir(aside))
    finally:
        shutil.rmtree(base.serving / "1", ignore_errors=True)
        os.rename(aside, base.serving / "1")


def test_editing_the_transform_module_reruns_transform_and_everything_downstream(base, rerun):
    with edited(base.transform_module, "NUM_BUCKETS = 10", "NUM_BUCKETS = 5"):
        result = rerun()
    assert states(result) == {**dict.fromkeys(DATA_HALF, "CACHED"), **dict.fromkeys(MODEL_HALF, "COMPLETE")}
    assert result.artifact("Transform", "transform_graph").id != base.result.artifact("Transform", "transform_graph").id
    assert result.artifact("Trainer", "model").id != base.result.artifact("Trainer", "model").id


def test_editing_the_trainer_module_retrains_but_keeps_transform_cached(base, rerun):
    with edited(base.trainer_module, '"learning_rate": 0.003', '"learning_rate": 0.01'):
        result = rerun()
    assert states(result) == {
        **dict.fromkeys((*DATA_HALF, "Transform"), "CACHED"),
        **dict.fromkeys(("Trainer", "Evaluator", "Pusher"), "COMPLETE"),
    }
    assert result.artifact("Trainer", "model").id != base.result.artifact("Trainer", "model").id


def test_one_module_file_for_both_means_any_edit_reruns_transform(base, tmp_path):
    """create_pipeline's layout: Transform and Trainer share taxi_utils.py, and the cache key holds the
    whole file, so even an edit to the trainer's hyperparameters gives Transform a new key.

    Shown on the cache key itself, with the base run's input artifacts (no run needed).
    """
    module = tmp_path / "taxi_utils.py"
    shutil.copy(MODULE_FILE, module)
    inputs = {
        "examples": [base.result.artifact("ExampleGen", "examples")],
        "schema": [base.result.artifact("SchemaGen", "schema")],
    }

    def transform_key() -> str:
        pipeline = taxi_pipeline(tmp_path / "root", base.data, tmp_path / "serving", module)
        assert pipeline.component("Trainer").params["module_file"] == str(module)
        return caching.cache_key(pipeline.component("Transform"), inputs)

    before = transform_key()
    assert transform_key() == before
    with edited(module, '"learning_rate": 0.003', '"learning_rate": 0.01'):
        assert transform_key() != before
    assert transform_key() == before


def test_new_train_steps_retrain_without_rerunning_transform(base, rerun):
    result = rerun(train_steps=TRAIN_STEPS + 10)
    assert states(result) == {
        **dict.fromkeys((*DATA_HALF, "Transform"), "CACHED"),
        **dict.fromkeys(("Trainer", "Evaluator", "Pusher"), "COMPLETE"),
    }
    assert result.artifact("Transform", "transform_graph").id == base.result.artifact("Transform", "transform_graph").id
    assert result.artifact("Trainer", "model").id != base.result.artifact("Trainer", "model").id


def test_new_data_content_reruns_everything_from_example_gen(base, rerun, taxi_csv):
    with open(taxi_csv) as f:
        more_rows = f.readlines()[1501:1801]
    original = base.data.read_text()
    try:
        with open(base.data, "a") as f:
            f.writelines(more_rows)
        result = rerun()
    finally:
        base.data.write_text(original)
    assert set(states(result).values()) == {"COMPLETE"}, states(result)
    assert sum(result.artifact("ExampleGen", "examples").properties["row_counts"].values()) == 1800


def test_module_files_are_staged_under_the_root_as_they_were_at_launch(base):
    """The Trainer ran the staged copy; an edit afterwards stages a new copy beside it, never over it."""
    store = MetadataStore(str(base.root / "metadata.sqlite"))
    [execution] = store.mlmd.get_executions_by_id([base.result.components["Trainer"].execution_id])
    staged = json.loads(execution.custom_properties["staged_modules"].string_value)["module_file"]
    assert staged.startswith(str(base.root / staging.STAGING_DIR)) and staged.endswith("/taxi_trainer.py")
    assert Path(staged).read_bytes() == base.trainer_module.read_bytes()
    assert staging.stage(str(base.root), str(base.trainer_module)) == staged  # content-addressed: same bytes, same copy
    with edited(base.trainer_module, '"learning_rate": 0.003', '"learning_rate": 0.01'):
        edited_copy = staging.stage(str(base.root), str(base.trainer_module))
        assert edited_copy != staged
        assert Path(edited_copy).read_bytes() == base.trainer_module.read_bytes()
    assert Path(staged).read_bytes() != Path(edited_copy).read_bytes()
