"""JSON <-> arrays for signatures other than the demo model's: other ranks, several outputs, bytes."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2

from beam_pipeline.serving import codec
from beam_pipeline.serving.errors import BadRequestError
from beam_pipeline.serving.models import SignatureInfo, TensorInfo

IMAGE = TensorInfo(tf.float32, (None, 2, 2))
FLAGS = TensorInfo(tf.bool, (None,))
ANY = TensorInfo(tf.int32, None)
SINGLE = SignatureInfo("single", {"pixels": IMAGE}, {})


def test_rank_3_rows_and_fixed_dims():
    arr = codec.decode_instances([[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]], SINGLE)["pixels"]
    assert arr.shape == (2, 2, 2) and arr.dtype == np.float32 and arr[1, 1, 1] == 8.5
    with pytest.raises(BadRequestError, match="dimension 2 must be 2"):
        codec.decode_instances([[[1, 2, 3], [3, 4, 5]]], SINGLE)
    with pytest.raises(BadRequestError, match="ragged"):
        codec.decode_instances([[[1, 2], [3]]], SINGLE)


def test_unknown_rank_is_taken_from_the_value():
    assert codec.to_array("x", [[1, 2], [3, 4]], ANY).shape == (2, 2)
    assert codec.to_array("x", 7, ANY).shape == ()
    with pytest.raises(BadRequestError, match="int32"):
        codec.to_array("x", [2**40], ANY)


def test_bools_and_single_input_columnar():
    sig = SignatureInfo("flags", {"f": FLAGS}, {})
    np.testing.assert_array_equal(codec.decode_inputs([True, False], sig)["f"], [True, False])
    np.testing.assert_array_equal(codec.decode_instances([True, False], sig)["f"], [True, False])
    with pytest.raises(BadRequestError, match="booleans"):
        codec.decode_inputs([1, 0], sig)


def test_several_outputs_row_and_columnar():
    outputs = {"scores": np.array([[0.5], [0.25]], np.float32), "ids": np.array([3, 4])}
    rows = orjson.loads(codec.dumps(codec.encode_predictions(outputs, 2)))
    assert rows == [{"scores": [0.5], "ids": 3}, {"scores": [0.25], "ids": 4}]
    columns = orjson.loads(codec.dumps(codec.encode_outputs(outputs)))
    assert columns == {"scores": [[0.5], [0.25]], "ids": [3, 4]}
    with pytest.raises(BadRequestError, match="columnar"):
        codec.encode_predictions({"total": np.array(1.0)}, 2)


def test_string_outputs_are_text_or_base64():
    outputs = {"label": np.array([b"yes", b"\xff"], dtype=object), "raw_bytes": np.array([b"yes"], dtype=object)}
    assert codec.encode_outputs({"label": outputs["label"]}) == ["yes", {"b64": base64.b64encode(b"\xff").decode()}]
    assert codec.encode_outputs({"raw_bytes": outputs["raw_bytes"]}) == [{"b64": "eWVz"}]


def test_float32_outputs_keep_their_short_form():
    assert codec.dumps(codec.encode_outputs({"s": np.array([0.1], np.float32)})) == b"[0.1]"


def test_examples_use_the_raw_feature_types_as_hints():
    hints = {"miles": TensorInfo(tf.float32, (None,)), "kind": TensorInfo(tf.string, (None,))}
    [serialized] = codec.encode_examples({"examples": [{"miles": 3}], "context": {"kind": "a"}}, hints)
    example = example_pb2.Example.FromString(serialized)
    assert example.features.feature["miles"].float_list.value == [3.0]
    assert example.features.feature["kind"].bytes_list.value == [b"a"]


def test_examples_without_hints_infer_types_from_json():
    [serialized] = codec.encode_examples({"examples": [{"n": [1, 2], "x": 1.5, "s": {"b64": "AA=="}}]}, None)
    feature = example_pb2.Example.FromString(serialized).features.feature
    assert feature["n"].int64_list.value == [1, 2]
    assert feature["x"].float_list.value == [1.5]
    assert feature["s"].bytes_list.value == [b"\x00"]


def test_classification_with_a_classes_output():
    outputs = {"classes": np.array([[b"0", b"1"]], dtype=object), "scores": np.array([[0.25, 0.75]], np.float32)}
    results = orjson.loads(codec.dumps(codec.classification_results(outputs, 1)))
    assert results == [[["0", 0.25], ["1", 0.75]]]
    with pytest.raises(BadRequestError, match="scores"):
        codec.classification_results({"classes": outputs["classes"]}, 1)


def test_regression_needs_one_value_per_example():
    assert codec.regression_results({"outputs": np.array([1.5, 2.5], np.float32)}, 2).tolist() == [1.5, 2.5]
    with pytest.raises(BadRequestError, match="batch_size"):
        codec.regression_results({"outputs": np.ones((2, 3), np.float32)}, 2)
    with pytest.raises(BadRequestError, match="outputs"):
        codec.regression_results({"a": np.ones(2), "b": np.ones(2)}, 2)
