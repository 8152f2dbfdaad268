"""The REST API against TF Serving's URLs and JSON, on the demo model, through Starlette's TestClient."""

from __future__ import annotations

import base64
import threading

import pytest

from beam_pipeline.serving.models import VersionState
from beam_pipeline.serving.testing import expected_score
from tests.serving.conftest import ROW, V1_BIAS, V2_BIAS

ROWS = [ROW, {"trip_miles": 12.5, "trip_seconds": 1500, "payment_type": "Credit Card"}]


def scores(rows: list[dict], bias: float) -> list[float]:
    return [expected_score(r["trip_miles"], r["payment_type"], bias) for r in rows]


@pytest.fixture
def client(client_factory):
    return client_factory()


def test_predict_row_format(client):
    r = client.post("/v1/models/taxi:predict", json={"instances": ROWS})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    # One output (`scores`, [None, 1]): TF Serving drops the output name and gives one [score] per row.
    assert [p[0] for p in predictions] == pytest.approx(scores(ROWS, V1_BIAS), rel=1e-6)


def test_predict_columnar_format(client):
    inputs = {k: [r[k] for r in ROWS] for k in ROW}
    r = client.post("/v1/models/taxi:predict", json={"signature_name": "serving_default", "inputs": inputs})
    assert r.status_code == 200, r.text
    assert [p[0] for p in r.json()["outputs"]] == pytest.approx(scores(ROWS, V1_BIAS), rel=1e-6)


def test_predict_accepts_b64_strings_and_integral_floats(client):
    row = {**ROW, "trip_miles": 2, "payment_type": {"b64": base64.b64encode(b"Cash").decode()}}
    r = client.post("/v1/models/taxi:predict", json={"instances": [row]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0][0] == pytest.approx(scores([ROW], V1_BIAS)[0], rel=1e-6)


def test_classify_and_regress_build_examples_for_from_examples(client):
    r = client.post("/v1/models/taxi:classify", json={"examples": ROWS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    # A scores-only signature has no class labels: TF Serving reports the label as "".
    assert [[label for label, _ in res] for res in results] == [[""], [""]]
    assert [res[0][1] for res in results] == pytest.approx(scores(ROWS, V1_BIAS), rel=1e-6)

    r = client.post("/v1/models/taxi:regress", json={"examples": ROWS})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == pytest.approx(scores(ROWS, V1_BIAS), rel=1e-6)


def test_regress_merges_context_into_every_example(client):
    body = {"context": {"payment_type": "Cash"}, "examples": [{"trip_miles": 2.0, "trip_seconds": 300}]}
    r = client.post("/v1/models/taxi:regress", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == pytest.approx(scores([ROW], V1_BIAS), rel=1e-6)


def test_status_and_metadata(client):
    r = client.get("/v1/models/taxi")
    assert r.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert client.get("/v1/models/taxi/versions/1").json() == r.json()

    meta = client.get("/v1/models/taxi/metadata").json()
    assert meta["model_spec"] == {"name": "taxi", "signature_name": "", "version": "1"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    serving = defs["serving_default"]
    assert serving["method_name"] == "tensorflow/serving/predict"
    assert serving["inputs"]["trip_miles"]["dtype"] == "DT_FLOAT"
    assert serving["inputs"]["trip_seconds"]["dtype"] == "DT_INT64"
    assert serving["inputs"]["payment_type"]["tensor_shape"] == {
        "dim": [{"size": "-1", "name": ""}],
        "unknown_rank": False,
    }
    assert serving["outputs"]["scores"]["tensor_shape"]["dim"] == [
        {"size": "-1", "name": ""},
        {"size": "1", "name": ""},
    ]
    assert defs["from_examples"]["inputs"]["examples"]["dtype"] == "DT_STRING"
    assert client.get("/v1/models/taxi/versions/1/metadata").json() == meta


def test_specific_versions_and_labels(client_factory, base_path, push):
    push(base_path, 2)
    client = client_factory(num_versions=2, version_labels={"stable": 1, "canary": 2})
    latest = client.post("/v1/models/taxi:predict", json={"instances": [ROW]}).json()["predictions"][0][0]
    v1 = client.post("/v1/models/taxi/versions/1:predict", json={"instances": [ROW]}).json()["predictions"][0][0]
    stable = client.post("/v1/models/taxi/labels/stable:predict", json={"instances": [ROW]}).json()
    canary = client.post("/v1/models/taxi/labels/canary:regress", json={"examples": [ROW]}).json()
    assert latest == pytest.approx(scores([ROW], V2_BIAS)[0], rel=1e-6)
    assert v1 == pytest.approx(scores([ROW], V1_BIAS)[0], rel=1e-6)
    assert stable["predictions"][0][0] == v1
    assert canary["results"][0] == latest
    assert client.get("/v1/models/taxi/labels/canary").json()["model_version_status"][0]["version"] == "2"
    assert client.get("/v1/models/taxi/labels/stable/metadata").json()["model_spec"]["version"] == "1"


def test_labelled_version_stays_loaded_when_newer_ones_arrive(client_factory, base_path, push):
    client = client_factory(version_labels={"stable": 1})
    push(base_path, 2)
    client.app.state.server.manager.poll_once()
    assert client.get("/v1/models/taxi/versions/1").json()["model_version_status"][0]["state"] == "AVAILABLE"
    assert client.get("/v1/models/taxi").json()["model_version_status"][0]["version"] == "2"


def test_new_version_is_picked_up_while_serving(client_factory, base_path, push):
    client = client_factory()
    before = client.post("/v1/models/taxi:predict", json={"instances": [ROW]}).json()["predictions"][0][0]
    push(base_path, 2)
    client.app.state.server.manager.poll_once()
    after = client.post("/v1/models/taxi:predict", json={"instances": [ROW]}).json()["predictions"][0][0]
    assert before == pytest.approx(scores([ROW], V1_BIAS)[0], rel=1e-6)
    assert after == pytest.approx(scores([ROW], V2_BIAS)[0], rel=1e-6)
    states = {s["version"]: s["state"] for s in client.get("/v1/models/taxi").json()["model_version_status"]}
    assert states == {"2": "AVAILABLE", "1": "END"}
    assert client.post("/v1/models/taxi/versions/1:predict", json={"instances": [ROW]}).status_code == 404


def test_background_poller_picks_up_a_pushed_version(client_factory, base_path, push):
    client = client_factory(poll_interval_s=0.05)
    manager = client.app.state.server.manager
    serving_v2 = threading.Event()
    poll_once = manager.poll_once

    def observed_poll() -> None:  # the poller thread looks the method up on every round
        poll_once()
        if any(s["version"] == "2" and s["state"] == "AVAILABLE" for s in manager.status()):
            serving_v2.set()

    manager.poll_once = observed_poll
    push(base_path, 2)
    assert serving_v2.wait(timeout=120), "the poller never loaded version 2"
    r = client.post("/v1/models/taxi:predict", json={"instances": [ROW]})
    assert r.json()["predictions"][0][0] == pytest.approx(scores([ROW], V2_BIAS)[0], rel=1e-6)


def test_in_flight_request_keeps_its_version_until_it_finishes(client_factory, base_path, push):
    client = client_factory()
    server = client.app.state.server
    with server.manager.acquire() as v1:  # a request that is still running on version 1
        push(base_path, 2)
        server.manager.poll_once()
        assert v1.state is VersionState.UNLOADING
        assert v1.run("serving_default", {k: [v] for k, v in ROW.items()})["scores"].shape == (1, 1)
        new = client.post("/v1/models/taxi:predict", json={"instances": [ROW]}).json()["predictions"][0][0]
        assert new == pytest.approx(scores([ROW], V2_BIAS)[0], rel=1e-6)
    assert v1.state is VersionState.END
    assert v1.refcount == 0


def test_no_version_yet_is_404_until_one_is_pushed(client_factory, tmp_path, push):
    empty = tmp_path / "empty"
    empty.mkdir()
    client = client_factory(str(empty))
    r = client.post("/v1/models/taxi:predict", json={"instances": [ROW]})
    assert r.status_code == 404 and "Latest(taxi)" in r.json()["error"]
    push(str(empty), 1)
    client.app.state.server.manager.poll_once()
    assert client.post("/v1/models/taxi:predict", json={"instances": [ROW]}).status_code == 200


def test_openapi_schema_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for prefix in (
        "/v1/models/{model_name}",
        "/v1/models/{model_name}/versions/{version}",
        "/v1/models/{model_name}/labels/{label}",
    ):
        assert {"get"} == set(paths[prefix]) == set(paths[f"{prefix}/metadata"])
        for verb in ("predict", "classify", "regress"):
            assert "requestBody" in paths[f"{prefix}:{verb}"]["post"]
