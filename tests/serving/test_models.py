"""Version discovery, loading and unloading of ModelManager, without HTTP."""

from __future__ import annotations

import gc
import os
import shutil
import weakref

import pytest

from beam_pipeline.serving.errors import BadRequestError, ServableNotFoundError
from beam_pipeline.serving.models import ModelManager, VersionState
from beam_pipeline.serving.names import parse_version, parse_version_labels
from tests.serving.conftest import ROW


def latest_version(manager: ModelManager) -> int:
    with manager.acquire() as servable:
        return servable.version


def test_scan_sees_integer_dirs_only(base_path, model_store):
    os.makedirs(os.path.join(base_path, "7", "variables"))  # a version without saved_model.pb: fails to load
    shutil.copytree(model_store[2], os.path.join(base_path, "latest"))
    shutil.copytree(model_store[2], os.path.join(base_path, "8.tmp"))
    shutil.copytree(model_store[2], os.path.join(base_path, ".tmp-9"))  # a push in progress
    shutil.copytree(model_store[2], os.path.join(base_path, "-9"))
    with open(os.path.join(base_path, "10"), "w") as f:  # a file, not a directory
        f.write("x")
    manager = ModelManager(base_path, "taxi")
    assert manager.scan() == {1: os.path.join(base_path, "1"), 7: os.path.join(base_path, "7")}
    manager.poll_once()
    assert latest_version(manager) == 1
    assert [(s["version"], s["state"], s["status"]["error_code"]) for s in manager.status()] == [
        ("7", "END", "NOT_FOUND"),
        ("1", "AVAILABLE", "OK"),
    ]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: shutil.rmtree(os.path.join(d, "variables")), id="variables-missing"),
        pytest.param(lambda d: open(os.path.join(d, "saved_model.pb"), "r+b").truncate(100), id="truncated-pb"),
        pytest.param(
            lambda d: open(os.path.join(d, "variables", "variables.data-00000-of-00001"), "r+b").truncate(8),
            id="truncated-variables",
        ),
    ],
)
def test_half_copied_version_is_skipped_then_loaded_once_complete(base_path, model_store, damage):
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    broken = os.path.join(base_path, "2")
    shutil.copytree(model_store[2], broken)
    damage(broken)
    manager.poll_once()
    assert latest_version(manager) == 1  # version 1 keeps serving, nothing raised

    shutil.rmtree(broken)
    shutil.copytree(model_store[2], broken)
    manager.poll_once()
    assert latest_version(manager) == 2


def test_newest_version_that_loads_is_served(tmp_path, push, model_store):
    base = str(tmp_path / "m")
    os.makedirs(base)
    push(base, 1)
    shutil.copytree(model_store[2], os.path.join(base, "5"))
    shutil.rmtree(os.path.join(base, "5", "variables"))
    manager = ModelManager(base, "taxi")
    manager.poll_once()  # at startup: 5 is broken, so 1 is loaded instead of nothing
    assert latest_version(manager) == 1


def test_num_versions_keeps_the_newest_n(base_path, push):
    push(base_path, 2)
    push(base_path, 2, as_version=3)
    manager = ModelManager(base_path, "taxi", num_versions=2)
    manager.poll_once()
    assert [s["version"] for s in manager.status()] == ["3", "2"]
    with pytest.raises(ServableNotFoundError, match=r"Specific\(taxi, 1\)"):
        with manager.acquire(1):
            pass


def test_version_removed_from_disk_is_unloaded(base_path, push):
    push(base_path, 2)
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    shutil.rmtree(os.path.join(base_path, "2"))
    manager.poll_once()
    assert latest_version(manager) == 1
    assert {s["version"]: s["state"] for s in manager.status()} == {"2": "END", "1": "AVAILABLE"}


def test_unload_waits_for_every_holder(base_path, push):
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    with manager.acquire() as first, manager.acquire() as second:
        assert first is second and first.refcount == 2
        push(base_path, 2)
        manager.poll_once()
        assert first.state is VersionState.UNLOADING
        assert manager.status(1)[0]["state"] == "UNLOADING"
        with manager.acquire() as newer:
            assert newer.version == 2
    assert first.state is VersionState.END and first.refcount == 0
    assert manager.status(1)[0]["state"] == "END"


def test_stop_unloads_everything(base_path):
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    manager.stop()
    assert manager.status()[0]["state"] == "END"
    with pytest.raises(ServableNotFoundError):
        with manager.acquire():
            pass


def test_missing_base_path_keeps_loaded_versions(base_path, tmp_path):
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    moved = str(tmp_path / "elsewhere")
    os.rename(base_path, moved)
    manager.poll_once()
    assert latest_version(manager) == 1


def test_servable_signatures_are_read_from_the_model(base_path):
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    with manager.acquire() as servable:
        raw = servable.signature("serving_default")
        assert {k: (v.kind, v.shape) for k, v in raw.inputs.items()} == {
            "trip_miles": ("float", (None,)),
            "trip_seconds": ("int", (None,)),
            "payment_type": ("string", (None,)),
        }
        assert {k: v.shape for k, v in raw.outputs.items()} == {"scores": (None, 1)}
        assert list(servable.signature("from_examples").inputs) == ["examples"]
        with pytest.raises(BadRequestError, match="nope"):
            servable.signature("nope")
        out = servable.run("serving_default", {k: [v] for k, v in ROW.items()})
        assert out["scores"].shape == (1, 1)
        assert servable.model_calls == 1


def test_model_errors_on_bad_data_are_bad_requests(base_path):
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    with manager.acquire() as servable, pytest.raises(BadRequestError, match="payment_type"):
        servable.run("from_examples", {"examples": [b""]})  # an Example without the required features


def test_model_name_and_labels_are_validated():
    with pytest.raises(ValueError, match="model name"):
        ModelManager("/nonexistent", "../etc")
    assert parse_version_labels("stable=3, canary=4") == {"stable": 3, "canary": 4}
    assert parse_version_labels("") == {}
    for bad in ("stable", "stable=x", "=3", "a/b=3", "stable=1,stable=2", "1abc=2"):
        with pytest.raises(ValueError):
            parse_version_labels(bad)
    assert parse_version("0042") == 42
    for bad in ("-1", "1.5", "../1", "", "1" * 19, "１"):
        with pytest.raises(BadRequestError):
            parse_version(bad)


def test_trailing_newline_is_not_a_valid_name_or_version():
    with pytest.raises(BadRequestError):
        parse_version("12\n")
    with pytest.raises(ValueError):
        ModelManager("/nonexistent", "taxi\n")


def test_frozen_gc_still_frees_unloaded_versions(base_path, push):
    manager = ModelManager(base_path, "taxi", freeze_gc=True)
    try:
        manager.poll_once()
        assert gc.get_freeze_count() > 0
        with manager.acquire() as v1:
            model = weakref.ref(v1._model)
        push(base_path, 2)
        manager.poll_once()  # unloads version 1, then collects before freezing again
        assert model() is None
    finally:
        gc.unfreeze()
