"""Serving from a model base path on S3 (moto on loopback): versions are prefixes, read through tf.io.gfile."""

from __future__ import annotations

import os

import pytest
from starlette.testclient import TestClient

from beam_pipeline.serving.models import SAVED_MODEL_FILE, ModelManager
from beam_pipeline.serving.server import create_app
from beam_pipeline.serving.testing import expected_score
from tests.serving.conftest import ROW, V1_BIAS, V2_BIAS


def upload(s3_server, local_dir: str, uri: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Put every file under `local_dir` at `uri` (s3://bucket/prefix) with boto3, bypassing the code under test."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client, keys = s3_server.client(), []
    for root, _, names in os.walk(local_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), local_dir)
            if relative not in skip:
                client.upload_file(os.path.join(root, name), bucket, f"{prefix}/{relative}")
                keys.append(relative)
    return keys


def served_version(manager: ModelManager) -> int:
    with manager.acquire() as servable:
        return servable.version


def test_a_version_on_s3_is_served_only_once_its_saved_model_pb_is_there(s3_server, s3_bucket, model_store):
    base = f"{s3_bucket}/models/taxi"
    upload(s3_server, model_store[1], f"{base}/1")
    manager = ModelManager(base, "taxi")
    assert manager.scan() == {1: f"{base}/1"}
    manager.poll_once()
    assert served_version(manager) == 1

    # A push in progress: everything but saved_model.pb, which the Pusher copies last.
    copied = upload(s3_server, model_store[2], f"{base}/2", skip=(SAVED_MODEL_FILE,))
    assert any(k.startswith("variables/") for k in copied)
    manager.poll_once()
    assert served_version(manager) == 1
    (entry,) = manager.status(2)
    assert (entry["state"], entry["status"]["error_code"]) == ("END", "NOT_FOUND")

    upload(s3_server, model_store[2], f"{base}/2")  # its objects changed: tried again at once, no backoff
    manager.poll_once()
    assert served_version(manager) == 2
    with manager.acquire() as servable:
        scores = servable.run("serving_default", {k: [v] for k, v in ROW.items()})["scores"]
    assert scores[0][0] == pytest.approx(expected_score(2.0, "Cash", V2_BIAS), rel=1e-6)
    manager.stop()


def test_app_on_an_empty_s3_prefix_starts_and_serves_the_first_push(s3_server, s3_bucket, model_store):
    base = f"{s3_bucket}/models/taxi"
    app = create_app(base, "taxi", poll_interval_s=0, freeze_gc=False)
    with TestClient(app) as client:
        assert client.get("/v1/models/taxi").status_code == 404  # nothing there yet, and no crash
        upload(s3_server, model_store[1], f"{base}/1")
        app.state.server.manager.poll_once()
        r = client.post("/v1/models/taxi:predict", json={"instances": [ROW]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0][0] == pytest.approx(expected_score(2.0, "Cash", V1_BIAS), rel=1e-6)
        status = client.get("/v1/models/taxi").json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("1", "AVAILABLE")]
