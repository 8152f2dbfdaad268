"""Versions that fail to load: reported in the status, retried with backoff or on change, never blocking serving."""

from __future__ import annotations

import logging
import os
import shutil
import threading

import pytest
import tensorflow as tf

from beam_pipeline.serving.models import ModelManager, load_servable
from tests.serving.conftest import ROW


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingLoader:
    """load_servable, counting attempts per version."""

    def __init__(self) -> None:
        self.attempts: dict[int, int] = {}

    def __call__(self, name: str, version: int, path: str):
        self.attempts[version] = self.attempts.get(version, 0) + 1
        return load_servable(name, version, path)


def served_version(manager: ModelManager) -> int:
    with manager.acquire() as servable:
        return servable.version


def statuses(manager: ModelManager) -> dict[str, tuple[str, str]]:
    return {s["version"]: (s["state"], s["status"]["error_code"]) for s in manager.status()}


def _save_module(path: str, module: tf.Module, signatures) -> None:
    tf.saved_model.save(module, path, signatures=signatures)


def write_unsignatured_model(path: str) -> None:
    module = tf.Module()
    module.v = tf.Variable(1.0)
    _save_module(path, module, None)


def write_complex_input_model(path: str) -> None:
    module = tf.Module()
    module.f = tf.function(lambda z: {"y": tf.math.real(z)}, input_signature=[tf.TensorSpec([None], tf.complex64)])
    _save_module(path, module, {"serving_default": module.f})


def truncate_pb(path: str) -> None:
    with open(os.path.join(path, "saved_model.pb"), "r+b") as f:
        f.truncate(100)


BROKEN = {
    "truncated-pb": (truncate_pb, "DATA_LOSS"),
    "no-saved-model-pb": (lambda d: os.remove(os.path.join(d, "saved_model.pb")), "NOT_FOUND"),
    "variables-missing": (lambda d: shutil.rmtree(os.path.join(d, "variables")), None),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_version_backs_off_reports_its_error_and_keeps_the_last_good_serving(
    base_path, model_store, kind, caplog
):
    damage, code = BROKEN[kind]
    clock, loader = FakeClock(), CountingLoader()
    manager = ModelManager(
        base_path, "taxi", loader=loader, clock=clock, load_retry_initial_s=10.0, load_retry_max_s=40.0
    )
    manager.poll_once()
    broken = os.path.join(base_path, "2")
    shutil.copytree(model_store[2], broken)
    damage(broken)
    caplog.set_level(logging.WARNING, logger="beam_pipeline.serving.models")

    def failure_logs() -> int:
        return sum(1 for r in caplog.records if "version 2 failed to load" in r.getMessage())

    manager.poll_once()
    assert served_version(manager) == 1
    (entry,) = manager.status(2)
    assert entry["state"] == "END" and entry["status"]["error_code"] != "OK"
    if code is not None:
        assert entry["status"]["error_code"] == code
    assert broken in entry["status"]["error_message"]
    assert statuses(manager)["1"] == ("AVAILABLE", "OK")
    assert loader.attempts[2] == 1 and failure_logs() == 1

    for _ in range(5):  # unchanged directory, backoff not over: no attempt, nothing logged
        manager.poll_once()
    assert loader.attempts[2] == 1 and failure_logs() == 1

    # Exponential backoff: 10 s after the first failure, then 20 s, then capped at 40 s.
    for wait, attempts in [(10.0, 2), (19.0, 2), (1.0, 3), (39.0, 3), (1.0, 4), (40.0, 5), (40.0, 6)]:
        clock.now += wait
        manager.poll_once()
        manager.poll_once()
        assert loader.attempts[2] == attempts, (wait, loader.attempts)
    assert failure_logs() == 6  # once per attempt
    assert served_version(manager) == 1

    # A new push of version 2 (its content changed) is tried at the next poll, backoff or not.
    shutil.rmtree(broken)
    shutil.copytree(model_store[2], broken)
    manager.poll_once()
    assert loader.attempts[2] == 7
    assert served_version(manager) == 2
    assert statuses(manager) == {"2": ("AVAILABLE", "OK"), "1": ("END", "OK")}


def test_a_change_inside_the_version_dir_triggers_a_retry(base_path, model_store):
    clock, loader = FakeClock(), CountingLoader()
    manager = ModelManager(
        base_path, "taxi", loader=loader, clock=clock, load_retry_initial_s=1000.0, load_retry_max_s=1000.0
    )
    broken = os.path.join(base_path, "2")
    shutil.copytree(model_store[2], broken)
    os.remove(os.path.join(broken, "saved_model.pb"))  # copied in place file by file, the .pb comes last
    manager.poll_once()
    manager.poll_once()
    assert loader.attempts[2] == 1 and served_version(manager) == 1
    shutil.copy(os.path.join(model_store[2], "saved_model.pb"), broken)
    manager.poll_once()
    assert loader.attempts[2] == 2 and served_version(manager) == 2
    assert statuses(manager)["2"] == ("AVAILABLE", "OK")


@pytest.mark.parametrize("write", [write_unsignatured_model, write_complex_input_model], ids=["none", "complex-input"])
def test_model_without_a_servable_signature_is_a_load_failure(base_path, write):
    write(os.path.join(base_path, "2"))
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    assert served_version(manager) == 1
    (entry,) = manager.status(2)
    assert entry["state"] == "END" and entry["status"]["error_code"] == "INVALID_ARGUMENT"
    assert "signature" in entry["status"]["error_message"]


def test_loading_state_is_reported_while_a_version_loads(base_path, push):
    started, release = threading.Event(), threading.Event()

    def slow_loader(name: str, version: int, path: str):
        if version == 2:
            started.set()
            release.wait(120)
        return load_servable(name, version, path)

    manager = ModelManager(base_path, "taxi", loader=slow_loader)
    manager.poll_once()
    push(base_path, 2)
    poller = threading.Thread(target=manager.poll_once)
    poller.start()
    try:
        assert started.wait(120)
        assert statuses(manager) == {"2": ("LOADING", "OK"), "1": ("AVAILABLE", "OK")}
        assert served_version(manager) == 1  # requests keep going to version 1 meanwhile
    finally:
        release.set()
        poller.join(120)
    assert statuses(manager) == {"2": ("AVAILABLE", "OK"), "1": ("END", "OK")}


def test_removed_broken_version_leaves_the_status(base_path, model_store):
    broken = os.path.join(base_path, "2")
    shutil.copytree(model_store[2], broken)
    truncate_pb(broken)
    manager = ModelManager(base_path, "taxi")
    manager.poll_once()
    assert "2" in statuses(manager)
    shutil.rmtree(broken)
    manager.poll_once()
    assert statuses(manager) == {"1": ("AVAILABLE", "OK")}


def test_only_a_broken_version_means_nothing_to_serve_and_says_why(tmp_path, model_store):
    base = str(tmp_path / "m")
    shutil.copytree(model_store[1], os.path.join(base, "1"))
    truncate_pb(os.path.join(base, "1"))
    manager = ModelManager(base, "taxi")
    manager.poll_once()
    assert statuses(manager) == {"1": ("END", "DATA_LOSS")}


def test_status_endpoint_reports_the_failure_and_predict_uses_the_last_good_version(client_factory, base_path, push):
    client = client_factory(poll_interval_s=0)
    server = client.app.state.server
    push(base_path, 2)
    truncate_pb(os.path.join(base_path, "2"))
    server.manager.poll_once()
    body = client.get("/v1/models/taxi").json()
    assert [(s["version"], s["state"], s["status"]["error_code"]) for s in body["model_version_status"]] == [
        ("2", "END", "DATA_LOSS"),
        ("1", "AVAILABLE", "OK"),
    ]
    assert os.path.join(base_path, "2") in body["model_version_status"][0]["status"]["error_message"]
    version_2 = client.get("/v1/models/taxi/versions/2")
    assert version_2.status_code == 200 and version_2.json()["model_version_status"][0]["state"] == "END"
    r = client.post("/v1/models/taxi:predict", json={"instances": [ROW]})
    assert r.status_code == 200
    assert client.post("/v1/models/taxi/versions/2:predict", json={"instances": [ROW]}).status_code == 404


def test_invalid_backoff_settings_are_rejected():
    with pytest.raises(ValueError, match="load_retry"):
        ModelManager("/nonexistent", "taxi", load_retry_initial_s=0)
    with pytest.raises(ValueError, match="load_retry"):
        ModelManager("/nonexistent", "taxi", load_retry_initial_s=10, load_retry_max_s=5)


def test_unreadable_version_dir_is_retried_by_the_backoff_only(base_path, model_store, monkeypatch):
    import beam_pipeline.serving.models as models

    broken = os.path.join(base_path, "2")
    shutil.copytree(model_store[2], broken)
    truncate_pb(broken)
    monkeypatch.setattr(models, "dir_fingerprint", lambda _path: None)  # as when a file in it cannot be read
    clock, loader = FakeClock(), CountingLoader()
    manager = ModelManager(base_path, "taxi", loader=loader, clock=clock, load_retry_initial_s=5.0)
    for _ in range(3):
        manager.poll_once()
    assert loader.attempts[2] == 1
    clock.now += 5.0
    manager.poll_once()
    assert loader.attempts[2] == 2
