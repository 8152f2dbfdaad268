"""The real taxi model end to end: trained and pushed by a pipeline run, served over HTTP, pushed again.

A pipeline run (1,500 rows, 20 train steps) pushes version 1; the server (in-process uvicorn on a
free loopback port) serves it, and its answers on raw CSV rows are checked against the pushed
SavedModel's own signatures. A second run with more train steps trains and pushes version 2 while the
server runs; the server must take it up. The server keeps two versions loaded, so every test can
address version 1 explicitly whether or not version 2 was pushed yet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pytest
import tensorflow as tf
import uvicorn

from beam_pipeline import launcher
from beam_pipeline.launcher import RunResult
from beam_pipeline.serving.server import create_app
from tests.test_model_caching import TRAIN_STEPS, states, taxi_pipeline

pytestmark = pytest.mark.slow

MODEL = "taxi"
URL = f"/v1/models/{MODEL}"
ROWS = 64
MAX_POLLS = 1200  # a bound on a wait (x 0.1 s), not a timing assertion


@dataclasses.dataclass
class Workspace:
    data: Path
    root: Path
    serving: Path
    first: RunResult


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, taxi_small_csv) -> Workspace:
    """The first pipeline run: trained, blessed and pushed as version 1."""
    work = tmp_path_factory.mktemp("taxi_e2e")
    data = work / "data.csv"
    shutil.copy(taxi_small_csv, data)
    root, serving = work / "root", work / "serving"
    first = launcher.run(taxi_pipeline(root, data, serving, train_steps=TRAIN_STEPS))
    assert set(states(first).values()) == {"COMPLETE"}, states(first)
    pushed = first.artifact("Pusher", "pushed_model").properties
    assert pushed["pushed"] == 1 and pushed["pushed_version"] == 1, pushed
    assert pushed["pushed_destination"] == str(serving / "1")
    return Workspace(data, root, serving, first)


@pytest.fixture(scope="module")
def version_1(workspace) -> Any:
    return tf.saved_model.load(str(workspace.serving / "1"))


@pytest.fixture(scope="module")
def client(workspace) -> Iterator[httpx.Client]:
    """An HTTP client of the server, which polls the serving directory every 0.2 s."""
    app = create_app(str(workspace.serving), MODEL, poll_interval_s=0.2, num_versions=2, freeze_gc=False)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(MAX_POLLS):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.1)
        assert server.started, "uvicorn did not start"
        port = sock.getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


# -- raw rows ----------------------------------------------------------------------------------------
_ARROW_TYPES = {tf.float32: pa.float32(), tf.int64: pa.int64(), tf.string: pa.string()}


@pytest.fixture(scope="module")
def columns(workspace, version_1) -> dict[str, np.ndarray]:
    return raw_columns(str(workspace.data), version_1, ROWS)


def raw_columns(data: str, model: Any, rows: int) -> dict[str, np.ndarray]:
    """The first rows of a taxi CSV as the model's serving_default takes them, missing values included.

    Types come from the signature; missing values follow its convention: NaN for floats, -1 for
    integers, "" for strings.
    """
    specs = model.signatures["serving_default"].structured_input_signature[1]
    types = {name: _ARROW_TYPES[spec.dtype] for name, spec in specs.items()}
    options = pcsv.ConvertOptions(column_types=types, include_columns=list(specs))
    table = pcsv.read_csv(data, convert_options=options).slice(0, rows)
    out = {}
    for name, spec in specs.items():
        column = table[name]
        if spec.dtype == tf.float32:
            out[name] = pc.fill_null(column, float("nan")).to_numpy()
        elif spec.dtype == tf.int64:
            out[name] = pc.fill_null(column, -1).to_numpy()
        else:
            out[name] = np.array([v.encode() for v in pc.fill_null(column, "").to_pylist()], dtype=object)
    return out


def missing(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.float32:
        return np.isnan(array)
    if array.dtype == np.int64:
        return array == -1
    return array == b""


def take(columns: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[mask] for name, array in columns.items()}


def json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item()


def instances(columns: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = len(next(iter(columns.values())))
    return [{name: json_value(array[i]) for name, array in columns.items()} for i in range(rows)]


def features(columns: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Rows as :classify/:regress take them: missing values are absent features."""
    return [
        {k: v for k, v in row.items() if v != "" and v != -1 and not (isinstance(v, float) and math.isnan(v))}
        for row in instances(columns)
    ]


def serialized_examples(rows: list[dict[str, Any]], columns: dict[str, np.ndarray]) -> list[bytes]:
    """The tf.train.Example of each feature row, typed by the raw columns' dtypes."""
    out = []
    for row in rows:
        feature = {}
        for name, value in row.items():
            kind = columns[name].dtype
            if kind == np.float32:
                feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
            elif kind == np.int64:
                feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
            else:
                feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        out.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return out


def scores(model: Any, columns: dict[str, np.ndarray]) -> np.ndarray:
    """serving_default of the SavedModel itself on the same rows."""
    fn = model.signatures["serving_default"]
    return fn(**{name: tf.constant(array) for name, array in columns.items()})["scores"].numpy()


@pytest.fixture(scope="module")
def complete_floats(columns) -> dict[str, np.ndarray]:
    """Rows whose float columns all have values (JSON has no NaN), with missing integers and strings."""
    floats = [name for name, array in columns.items() if array.dtype == np.float32]
    keep = ~np.any([missing(columns[name]) for name in floats], axis=0)
    rows = take(columns, keep)
    assert len(rows["fare"]) >= ROWS // 2
    for kind in (np.int64, object):
        assert any(missing(a).any() for a in rows.values() if a.dtype == kind), f"no missing {kind} value"
    return rows


# -- tests -------------------------------------------------------------------------------------------
def test_pushed_version_is_available_with_the_models_signatures(client):
    status = client.get(f"{URL}/versions/1").json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("1", "AVAILABLE")]
    signatures = client.get(f"{URL}/versions/1/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "from_examples", "transform_features"} <= set(signatures)


def test_predict_rows_and_columns_match_the_saved_model(client, version_1, complete_floats):
    expected = scores(version_1, complete_floats)
    rows = client.post(f"{URL}/versions/1:predict", json={"instances": instances(complete_floats)})
    assert rows.status_code == 200, rows.text
    assert np.allclose(np.array(rows.json()["predictions"]), expected)
    columnar = {name: [json_value(v) for v in array] for name, array in complete_floats.items()}
    cols = client.post(f"{URL}/versions/1:predict", json={"inputs": columnar})
    assert cols.status_code == 200, cols.text
    assert np.allclose(np.array(cols.json()["outputs"]), expected)
    assert 0 < expected.min() and expected.max() < 1 and expected.std() > 0


def test_predict_missing_floats_as_nan(client, version_1, columns):
    body = json.dumps({"instances": instances(columns)})  # allow_nan: NaN tokens, as TF Serving clients send
    assert "NaN" in body
    r = client.post(f"{URL}/versions/1:predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert np.allclose(np.array(r.json()["predictions"]), scores(version_1, columns))


def test_raw_and_example_signatures_agree_on_missing_values(version_1, columns):
    """The model's contract: NaN/-1/"" in serving_default mean what an absent feature means in from_examples."""
    examples = serialized_examples(features(columns), columns)
    from_examples = version_1.signatures["from_examples"](examples=tf.constant(examples))["scores"].numpy()
    assert np.allclose(from_examples, scores(version_1, columns))


def test_classify_and_regress_match_from_examples(client, version_1, columns):
    rows = features(columns)
    assert any(len(row) < len(columns) for row in rows)  # some rows have missing features, floats included
    expected = version_1.signatures["from_examples"](examples=tf.constant(serialized_examples(rows, columns)))
    expected = expected["scores"].numpy().reshape(-1)

    classified = client.post(f"{URL}/versions/1:classify", json={"examples": rows})
    assert classified.status_code == 200, classified.text
    results = classified.json()["results"]
    assert [[label for label, _ in r] for r in results] == [[""]] * len(rows)
    assert np.allclose([r[0][1] for r in results], expected)

    regressed = client.post(f"{URL}/versions/1:regress", json={"examples": rows})
    assert regressed.status_code == 200, regressed.text
    assert np.allclose(regressed.json()["results"], expected)


def test_second_push_is_taken_up_while_serving(workspace, client, version_1, complete_floats):
    second = launcher.run(taxi_pipeline(workspace.root, workspace.data, workspace.serving, train_steps=TRAIN_STEPS * 2))
    assert second.components["Transform"].state == "CACHED"
    assert second.components["Trainer"].state == "COMPLETE"
    pushed = second.artifact("Pusher", "pushed_model").properties
    assert pushed["pushed"] == 1 and pushed["pushed_version"] == 2, pushed

    for _ in range(MAX_POLLS):
        status = {s["version"]: s["state"] for s in client.get(URL).json()["model_version_status"]}
        if status.get("2") == "AVAILABLE":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"version 2 was never AVAILABLE: {status}")

    version_2 = tf.saved_model.load(os.path.join(workspace.serving, "2"))
    expected = scores(version_2, complete_floats)
    assert not np.allclose(expected, scores(version_1, complete_floats))  # a different model
    latest = client.post(f"{URL}:predict", json={"instances": instances(complete_floats)})
    assert latest.status_code == 200, latest.text
    assert np.allclose(np.array(latest.json()["predictions"]), expected)
    # Version 1 is still served on request (num_versions=2).
    old = client.post(f"{URL}/versions/1:predict", json={"instances": instances(complete_floats)})
    assert np.allclose(np.array(old.json()["predictions"]), scores(version_1, complete_floats))
