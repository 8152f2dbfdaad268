"""Pusher: blessed models become new integer versions under the serving dir, atomically; others never."""

from __future__ import annotations

import json
import os
import re

import apache_beam as beam
import pytest

from beam_pipeline.artifacts import MODEL, MODEL_BLESSING, PUSHED_MODEL, Artifact
from beam_pipeline.dsl import Component, ComponentContext
from beam_pipeline.errors import PipelineDefinitionError
from tests.helpers import in_process_pipeline, read_only_directory
from transforms import pusher as pu


class _Source(Component):
    OUTPUTS = {"model": MODEL, "blessing": MODEL_BLESSING}

    def __init__(self):
        super().__init__(inputs={})


def _pusher(serving_dir) -> pu.Pusher:
    src = _Source()
    return pu.Pusher(model=src.outputs.model, blessing=src.outputs.blessing, serving_model_dir=str(serving_dir))


def _model(root, name="model") -> Artifact:
    """A Model artifact whose Format-Serving directory looks like a SavedModel."""
    uri = root / name
    files = {
        "saved_model.pb": b"graph-" + name.encode(),
        "variables/variables.index": b"index",
        "variables/variables.data-00000-of-00001": os.urandom(4096),
        "assets/vocab.txt": b"a\nb\n",
    }
    for rel, data in files.items():
        path = uri / pu.SERVING_MODEL_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Artifact(MODEL, str(uri), {})


def _blessing(model: Artifact, blessed: int, message: str = "") -> Artifact:
    props = {"blessed": blessed, "model_uri": model.uri, "blessing_message": message}
    return Artifact(MODEL_BLESSING, model.uri + "-blessing", props)


def _tree(path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def _run(pusher: pu.Pusher, model: Artifact, blessing: Artifact, root, resolved=None) -> dict:
    """Apply the Pusher in a pipeline as the compiler would; return the published properties."""
    out_uri = str(root / "pushed_model")
    record = str(root / "properties.json")

    def commit(name, properties):
        def write(dicts):
            with open(record, "w") as f:
                json.dump({k: v for d in dicts for k, v in d.items()}, f)
            return Artifact(PUSHED_MODEL, out_uri, {})

        return properties | "Gather" >> beam.combiners.ToList() | "Commit" >> beam.Map(write)

    ctx = ComponentContext(
        pipeline_name="test",
        pipeline_root=str(root),
        run_id="run",
        execution_id=1,
        output_uris={"pushed_model": out_uri},
        input_static={},
        output_static={},
        resolved=resolved or {},
        commit_factory=commit,
    )
    with in_process_pipeline() as p:
        inputs = {"model": p | "Model" >> beam.Create([model]), "blessing": p | "Blessing" >> beam.Create([blessing])}
        pusher.bind(ctx)
        try:
            inputs | pusher
        finally:
            pusher.bind(None)
    with open(record) as f:
        props = json.load(f)
    with open(os.path.join(out_uri, pu.RESULT_FILE)) as f:
        assert json.load(f)["pushed"] == props["pushed"]
    return props


def test_blessed_model_is_pushed_as_increasing_versions(tmp_path):
    serving = tmp_path / "serving"
    first, second = _model(tmp_path, "first"), _model(tmp_path, "second")

    props = _run(_pusher(serving), first, _blessing(first, 1), tmp_path / "run1")
    assert props == {
        "pushed": 1,
        "pushed_version": 1,
        "pushed_destination": str(serving / "1"),
        "model_uri": first.uri,
        "push_message": f"pushed model {first.uri} as version 1 to {serving / '1'}",
    }
    assert _tree(serving / "1") == _tree(os.path.join(first.uri, pu.SERVING_MODEL_DIR))

    props = _run(_pusher(serving), second, _blessing(second, 1), tmp_path / "run2")
    assert props["pushed_version"] == 2
    assert sorted(os.listdir(serving)) == ["1", "2"]  # no temp directory left behind
    assert _tree(serving / "2")["saved_model.pb"] == b"graph-second"


def test_version_is_one_above_the_highest_existing_version(tmp_path):
    serving = tmp_path / "serving"
    for name in ("3", "17", "notes", ".push-tmp-stale"):
        (serving / name).mkdir(parents=True)
    model = _model(tmp_path)
    version, destination = pu.push_model(os.path.join(model.uri, pu.SERVING_MODEL_DIR), str(serving))
    assert (version, destination) == (18, str(serving / "18"))
    assert pu.existing_versions(str(serving)) == [3, 17, 18]


def test_version_taken_by_a_racing_push_moves_to_the_next_number(tmp_path, monkeypatch):
    serving = tmp_path / "serving"
    (serving / "1").mkdir(parents=True)
    (serving / "1" / "saved_model.pb").write_bytes(b"the other push")
    listings = iter([[], [1]])  # the first listing is taken before the other push landed
    monkeypatch.setattr(pu, "existing_versions", lambda _: next(listings))
    model = _model(tmp_path)
    assert pu.push_model(os.path.join(model.uri, pu.SERVING_MODEL_DIR), str(serving))[0] == 2
    assert (serving / "1" / "saved_model.pb").read_bytes() == b"the other push"
    assert sorted(os.listdir(serving)) == ["1", "2"]


def test_not_blessed_model_is_not_pushed(tmp_path, caplog):
    serving = tmp_path / "serving"
    model = _model(tmp_path)
    blessing = _blessing(model, 0, "not blessed: auc on slice Overall: 0.61 vs baseline 0.7 (change -0.09)")
    with caplog.at_level("WARNING", logger=pu.__name__):
        props = _run(_pusher(serving), model, blessing, tmp_path)
    assert props["pushed"] == 0
    assert "pushed_version" not in props and "pushed_destination" not in props
    assert props["push_message"].startswith(f"model {model.uri} is not blessed; nothing pushed to {serving}")
    assert "auc on slice Overall" in props["push_message"]
    assert "is not blessed" in caplog.text
    assert not serving.exists()


def test_rerun_with_the_model_already_served_does_not_copy_it_again(tmp_path):
    serving = tmp_path / "serving"
    model = _model(tmp_path)
    first = _run(_pusher(serving), model, _blessing(model, 1), tmp_path / "run1")
    previous = {k: first[k] for k in ("model_uri", "pushed_destination", "pushed_version")}

    again = _run(_pusher(serving), model, _blessing(model, 1), tmp_path / "run2", {"previous_push": previous})
    assert again["pushed"] == 1 and again["pushed_version"] == 1
    assert "not copied again" in again["push_message"]
    assert os.listdir(serving) == ["1"]

    (serving / "2").mkdir()  # someone pushed another model since: ours is pushed again to be newest
    newest = _run(_pusher(serving), model, _blessing(model, 1), tmp_path / "run3", {"previous_push": previous})
    assert newest["pushed_version"] == 3


def test_blessing_of_another_model_is_refused(tmp_path):
    model, other = _model(tmp_path, "a"), _model(tmp_path, "b")
    push = pu._Push(str(tmp_path / "serving"), str(tmp_path / "out"), None)
    with pytest.raises(PipelineDefinitionError, match=r"is for model '.*/b', not for"):
        push(_blessing(other, 1), model)


def test_serving_dir_under_a_file_is_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    serving = blocker / "models" / "taxi"
    pusher = _pusher(serving)
    with pytest.raises(PipelineDefinitionError, match=re.escape(f"serving_model_dir '{serving}' is not writable")):
        pusher.static_outputs({})
    model = _model(tmp_path)
    with pytest.raises(PipelineDefinitionError, match=re.escape(f"'{serving}' is not writable")):
        pu.push_model(os.path.join(model.uri, pu.SERVING_MODEL_DIR), str(serving))


def test_read_only_serving_dir_is_not_writable(tmp_path):
    serving = tmp_path / "serving"
    serving.mkdir()
    with (
        read_only_directory(str(serving)),
        pytest.raises(PipelineDefinitionError, match=re.escape(f"'{serving}' is not writable")),
    ):
        _pusher(serving).static_outputs({})


def test_serving_dir_that_does_not_exist_yet_is_fine(tmp_path):
    pusher = _pusher(tmp_path / "a" / "b")
    assert pusher.static_outputs({}) == {"pushed_model": {}}
    assert not (tmp_path / "a").exists()  # the check leaves nothing behind


def test_cache_key_follows_the_versions_in_the_serving_dir(tmp_path):
    pusher = _pusher(tmp_path / "serving")
    empty = pusher.external_fingerprint()
    (tmp_path / "serving" / "1").mkdir(parents=True)
    (tmp_path / "serving" / ".tmp-push").mkdir()
    one = pusher.external_fingerprint()
    assert one != empty  # a version appeared: a cached push is no longer trusted
    assert pusher.external_fingerprint() == one  # temp dirs do not count


def test_remote_or_missing_serving_dir_is_rejected():
    with pytest.raises(PipelineDefinitionError, match="only local directories"):
        _pusher("gs://bucket/models")
    with pytest.raises(PipelineDefinitionError, match="needs serving_model_dir"):
        _pusher("")


class _FakeStore:
    def __init__(self, artifacts):
        self.artifacts = artifacts

    def latest_artifacts(self, type_name, pipeline_name, properties=None):
        found = [
            a
            for a in self.artifacts
            if a.type.name == type_name and all(a.properties.get(k) == v for k, v in (properties or {}).items())
        ]
        return sorted(found, key=lambda a: a.id, reverse=True)


def test_resolve_returns_the_last_push_of_this_pusher(tmp_path):
    pusher = _pusher(tmp_path)
    mine = {"producer_component": "Pusher", "pushed": 1, "model_uri": "/m/2", "pushed_destination": "/s/2"}
    store = _FakeStore(
        [
            Artifact(PUSHED_MODEL, "/p/1", {**mine, "pushed_version": 1, "model_uri": "/m/1"}, id=1),
            Artifact(PUSHED_MODEL, "/p/2", {**mine, "pushed_version": 2}, id=2),
            Artifact(PUSHED_MODEL, "/p/3", {**mine, "pushed": 0}, id=3),
            Artifact(PUSHED_MODEL, "/p/4", {**mine, "producer_component": "Other"}, id=4),
        ]
    )
    assert pusher.resolve(store, "p") == {
        "previous_push": {"model_uri": "/m/2", "pushed_destination": "/s/2", "pushed_version": 2}
    }
    assert pusher.resolve(_FakeStore([]), "p") == {}
