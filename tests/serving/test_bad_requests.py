"""Bad requests are 4xx with {"error": ...} naming the problem; nothing a client sends gives a 5xx.

The hypothesis tests throw generated paths and bodies (random JSON, and near-valid requests with wrong
features, types and shapes) at every route and count the responses >= 500, which must be zero.
"""

from __future__ import annotations

import json
import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.conftest import ROW

PREDICT = "/v1/models/taxi:predict"


@pytest.fixture
def client(client_factory):
    return client_factory(raise_server_exceptions=False, max_request_bytes=4096, version_labels={"stable": 1})


def assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"instances": [{**ROW, "tip": 1.0}]}, ["unknown input", "'tip'"]),
        ({"instances": [{"trip_miles": 1.0, "payment_type": "Cash"}]}, ["missing input", "'trip_seconds'"]),
        ({"instances": [{**ROW, "trip_miles": "far"}]}, ["'trip_miles'", "float32"]),
        ({"instances": [{**ROW, "trip_miles": True}]}, ["'trip_miles'", "float32"]),
        ({"instances": [{**ROW, "trip_miles": None}]}, ["'trip_miles'", "float32"]),
        ({"instances": [{**ROW, "trip_seconds": None}]}, ["'trip_seconds'", "int64"]),
        ({"instances": [{**ROW, "trip_seconds": 2.5}]}, ["'trip_seconds'", "int64"]),
        ({"instances": [{**ROW, "trip_seconds": 2**63}]}, ["'trip_seconds'", "int64"]),
        ({"instances": [{**ROW, "payment_type": 3}]}, ["'payment_type'", "string"]),
        ({"instances": [{**ROW, "payment_type": {"b64": "!!"}}]}, ["'payment_type'", "base64"]),
        ({"instances": [{**ROW, "payment_type": {"b64": "\x80"}}]}, ["'payment_type'", "base64", "ASCII"]),
        ({"instances": [{**ROW, "trip_miles": [1.0, 2.0]}]}, ["'trip_miles'", "rank-1"]),
        ({"instances": [ROW, [1, 2]]}, ["instances[1]"]),
        ({"instances": []}, ["'instances'"]),
        ({"instances": {"trip_miles": 1}}, ["'instances'"]),
        ({"inputs": {"trip_miles": [1.0, 2.0], "trip_seconds": [[1]], "payment_type": ["a"]}}, ["'trip_seconds'"]),
        ({"inputs": {"trip_miles": [[1.0], [2.0, 3.0]], "trip_seconds": [1], "payment_type": ["a"]}}, ["'trip_miles'"]),
        ({"inputs": [1, 2, 3]}, ["'inputs'"]),
        ({"inputs": {k: [v] for k, v in ROW.items()}, "instances": [ROW]}, ["exactly one"]),
        ({}, ["exactly one"]),
        ({"signature_name": "nope", "instances": [ROW]}, ["nope"]),
        ({"signature_name": 7, "instances": [ROW]}, ["signature_name"]),
        ({"signature_name": "from_examples", "instances": [ROW]}, ["unknown input", "['examples']"]),
    ],
)
def test_predict_bad_bodies(client, body, words):
    assert_error(client.post(PREDICT, json=body), 400, *words)


@pytest.mark.parametrize(
    ("verb", "body", "words"),
    [
        ("classify", {"examples": [{**ROW, "tip": 1.0}]}, ["unknown feature", "'tip'"]),
        ("classify", {"examples": [{"trip_miles": 1.0, "trip_seconds": 3}]}, ["payment_type"]),
        ("regress", {"examples": [{**ROW, "trip_miles": "far"}]}, ["'trip_miles'"]),
        ("regress", {"examples": [{**ROW, "trip_seconds": 1.5}]}, ["'trip_seconds'"]),
        ("regress", {"examples": [{**ROW, "trip_miles": None}]}, ["'trip_miles'"]),
        ("classify", {"examples": [{**ROW, "payment_type": {"b64": "\x80"}}]}, ["'payment_type'", "base64"]),
        ("regress", {"examples": "x"}, ["'examples'"]),
        ("regress", {"examples": [ROW, 3]}, ["examples[1]"]),
        ("regress", {"examples": [ROW], "context": []}, ["'context'"]),
        ("regress", {"signature_name": "serving_default", "examples": [ROW]}, ["serving_default"]),
    ],
)
def test_classify_and_regress_bad_bodies(client, verb, body, words):
    assert_error(client.post(f"/v1/models/taxi:{verb}", json=body), 400, *words)


@pytest.mark.parametrize(
    ("method", "path", "status", "word"),
    [
        ("POST", "/v1/models/other:predict", 404, "other"),
        ("GET", "/v1/models/other", 404, "other"),
        ("POST", "/v1/models/taxi/versions/9:predict", 404, "9"),
        ("GET", "/v1/models/taxi/versions/9/metadata", 404, "9"),
        ("GET", "/v1/models/taxi/versions/9", 404, "9"),
        ("POST", "/v1/models/taxi/versions/one:predict", 400, "version"),
        ("POST", "/v1/models/taxi/versions/-1:predict", 400, "version"),
        ("POST", "/v1/models/taxi/labels/canary:predict", 404, "canary"),
        ("POST", "/v1/models/taxi/labels/no%20pe:predict", 400, "label"),
        ("POST", "/v1/models/..%2F..%2Fetc:predict", 404, ""),
        ("POST", "/v1/models/..:predict", 400, "model name"),
        ("GET", "/v1/models/taxi%00", 400, "model name"),
        ("POST", "/v1/models/taxi/versions/..%2F1:predict", 404, ""),
        ("GET", "/v1/models/taxi:predict", 400, "model name"),
        ("PUT", "/v1/models/taxi:predict", 405, ""),
        ("GET", "/nowhere", 404, ""),
    ],
)
def test_bad_urls(client, method, path, status, word):
    assert_error(client.request(method, path, json={"instances": [ROW]}), status, word)


@pytest.mark.parametrize(
    "content", [b'{"instances": [', b"[1, 2]", b'"text"', b"", b"\xff\xfe", b'{"instances": [NaN]}', b"{" * 5000]
)
def test_malformed_json(client, content):
    r = client.post(PREDICT, content=content)
    assert r.status_code in (400, 413), r.text
    assert "error" in r.json()


def test_body_size_limit(client):
    big = json.dumps({"instances": [ROW] * 100}).encode()
    assert_error(client.post(PREDICT, content=big), 413, "limit")

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(10):
            yield b" " * 1000

    assert_error(client.post(PREDICT, content=chunks()), 413, "limit")
    # The server is still fine afterwards.
    assert client.post(PREDICT, json={"instances": [ROW]}).status_code == 200


_SEGMENT = st.one_of(
    st.sampled_from(["taxi", "1", "2", "stable", "..", ".", "-1", "0", "99999999999999999999", "%2F", "%00"]),
    st.text(alphabet=string.printable, max_size=12).map(lambda s: quote(s, safe="")),
    st.text(max_size=6).map(lambda s: quote(s, safe="")),
)
_PATHS = st.builds(
    lambda name, sel, value, tail: f"/v1/models/{name}{sel.format(value)}{tail}",
    _SEGMENT,
    st.sampled_from(["", "/versions/{}", "/labels/{}"]),
    _SEGMENT,
    st.sampled_from(["", "/metadata", ":predict", ":classify", ":regress", ":explode", "/"]),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.fixed_dictionaries({"b64": st.text(max_size=8)}),
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_FEATURE_NAMES = st.sampled_from([*ROW, "tip", ""])
_ROWS = st.dictionaries(_FEATURE_NAMES, _JSON, max_size=5) | st.fixed_dictionaries({k: _JSON for k in ROW})
_BODIES = st.one_of(
    _JSON,
    st.fixed_dictionaries({"instances": st.lists(_ROWS, max_size=4)}, optional={"signature_name": _JSON}),
    st.fixed_dictionaries({"inputs": st.dictionaries(_FEATURE_NAMES, _JSON, max_size=4)}),
    st.fixed_dictionaries({"examples": st.lists(_ROWS, max_size=4)}, optional={"context": _JSON}),
)
_FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(method=st.sampled_from(["GET", "POST", "DELETE"]), path=_PATHS, body=_BODIES)
def test_fuzz_no_server_errors(client, method, path, body):
    r = client.request(method, path, content=json.dumps(body))
    assert r.status_code < 500, (method, path, body, r.text)
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str)


@_FUZZ
@given(verb=st.sampled_from(["predict", "classify", "regress"]), body=_BODIES | st.binary(max_size=64).map(bytes))
def test_fuzz_inference_bodies(client, verb, body):
    content = body if isinstance(body, bytes) else json.dumps(body)
    r = client.post(f"/v1/models/taxi:{verb}", content=content)
    assert r.status_code < 500, (verb, body, r.text)
    assert r.status_code == 200 or "error" in r.json()
