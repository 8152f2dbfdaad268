"""TF Serving's REST JSON <-> numpy arrays, validated against a signature before the model sees them.

Every problem with a request becomes a BadRequestError naming the field, so a bad request is a 400 and
never reaches TensorFlow (where it would be an opaque runtime error, or worse, a crash).
"""

from __future__ import annotations

import base64
import json
import reprlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import tensorflow as tf
from tensorflow.core.example import example_pb2, feature_pb2

from beam_pipeline.serving.errors import BadRequestError
from beam_pipeline.serving.models import SignatureInfo, TensorInfo

_ALL_GOOD = object()  # what `next(bad values, ...)` returns when every value is fine (null can be a bad value)
_JSON_NUMPY_KINDS = frozenset("biuf")  # numpy kinds orjson serializes natively
# The value types of tf.train.Feature lists.
_BYTES, _INT64, _FLOAT = TensorInfo(tf.string, None), TensorInfo(tf.int64, None), TensorInfo(tf.float32, None)


_REPR = reprlib.Repr()  # short reprs of bad values, however large the value is
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxdict = 4


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_REPR.repr(value)}"


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        # TF Serving's REST API accepts NaN/Infinity/-Infinity for floats (strict JSON does not,
        # nor does orjson); the standard parser takes them, and the taxi model's missing float is NaN.
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequestError(f"malformed JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequestError(f"request body must be a JSON object, got {type(payload).__name__}")
    return payload


def signature_name(payload: Mapping[str, Any], default: str) -> str:
    name = payload.get("signature_name", default)
    if not isinstance(name, str):
        raise BadRequestError(f"'signature_name' must be a string, got {_describe(name)}")
    return name or default


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _b64decode(field: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequestError(f"{field!r}: 'b64' must hold a base64 string, got {_describe(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as e:  # binascii.Error, or a non-ASCII string
        raise BadRequestError(f"{field!r}: invalid base64: {e}") from None


def _scalars(field: str, flat: list[Any], info: TensorInfo) -> np.ndarray:
    kind = info.kind
    if kind == "string":
        out = np.empty(len(flat), dtype=object)
        for i, v in enumerate(flat):
            if type(v) is str:
                out[i] = v.encode()
            elif _is_b64(v):
                out[i] = _b64decode(field, v["b64"])
            else:
                raise BadRequestError(f'{field!r}: expected strings (or {{"b64": ...}}), got {_describe(v)}')
        return out
    if kind == "bool":
        bad = next((v for v in flat if type(v) is not bool), _ALL_GOOD)
        if bad is not _ALL_GOOD:
            raise BadRequestError(f"{field!r}: expected booleans, got {_describe(bad)}")
        return np.array(flat, dtype=np.bool_)
    if kind == "float":
        bad = next((v for v in flat if type(v) is not float and type(v) is not int), _ALL_GOOD)
        if bad is not _ALL_GOOD:
            raise BadRequestError(f"{field!r}: expected {info.dtype.name} numbers, got {_describe(bad)}")
        return np.array(flat, dtype=info.numpy_dtype)
    if kind == "int":
        low, high = info.bounds
        bad = next((v for v in flat if type(v) is not int or not low <= v <= high), _ALL_GOOD)
        if bad is not _ALL_GOOD:
            raise BadRequestError(f"{field!r}: expected {info.dtype.name} integers, got {_describe(bad)}")
        return np.array(flat, dtype=info.numpy_dtype)
    raise BadRequestError(f"{field!r}: inputs of dtype {info.dtype.name} cannot be sent as JSON")


def to_array(field: str, value: Any, info: TensorInfo) -> np.ndarray:
    """Nested JSON lists -> an array of the signature's dtype; the shape must fit the signature's."""
    if info.shape is not None:
        rank = len(info.shape)
    else:
        rank, probe = 0, value
        while isinstance(probe, list):
            rank += 1
            probe = probe[0] if probe else None
    level, dims = [value], []
    for depth in range(rank):
        size = None
        below: list[Any] = []
        for item in level:
            if not isinstance(item, list):
                raise BadRequestError(f"{field!r}: expected a rank-{rank} value, found a scalar at depth {depth}")
            if size is None:
                size = len(item)
            elif len(item) != size:
                raise BadRequestError(f"{field!r}: ragged lists at depth {depth} ({size} vs {len(item)} elements)")
            below.extend(item)
        size = size or 0
        if info.shape is not None and info.shape[depth] is not None and info.shape[depth] != size:
            raise BadRequestError(f"{field!r}: dimension {depth} must be {info.shape[depth]}, got {size}")
        dims.append(size)
        level = below
    if any(isinstance(v, list) for v in level):
        raise BadRequestError(f"{field!r}: expected a rank-{rank} value, got deeper nested lists")
    return _scalars(field, level, info).reshape(dims)


def decode_instances(instances: Any, sig: SignatureInfo) -> dict[str, np.ndarray]:
    """Row format: one JSON object (or bare value, for a single-input signature) per batch row."""
    if not isinstance(instances, list) or not instances:
        raise BadRequestError("'instances' must be a non-empty list")
    if not sig.batched:
        raise BadRequestError(
            f"signature {sig.name!r} has inputs without a batch dimension; send the columnar 'inputs' format"
        )
    names = sig.inputs
    columns: dict[str, list[Any]] = {name: [] for name in names}
    single = next(iter(names)) if len(names) == 1 else None
    for i, row in enumerate(instances):
        if single is not None and (not isinstance(row, dict) or _is_b64(row)):
            columns[single].append(row)
            continue
        if not isinstance(row, dict):
            raise BadRequestError(f"instances[{i}]: expected an object of inputs {sorted(names)}, got {_describe(row)}")
        if row.keys() != names.keys():
            _raise_key_mismatch(f"instances[{i}]", row.keys(), names.keys())
        for name, value in row.items():
            columns[name].append(value)
    return {name: _column(name, columns[name], info) for name, info in names.items()}


def _column(name: str, values: list[Any], info: TensorInfo) -> np.ndarray:
    # The usual serving input is one scalar per row (shape [None]): skip to_array's shape walk.
    if info.shape is not None and len(info.shape) == 1 and not any(type(v) is list for v in values):
        return _scalars(name, values, info)
    return to_array(name, values, info)


def decode_inputs(inputs: Any, sig: SignatureInfo) -> dict[str, np.ndarray]:
    """Columnar format: `{"inputs": {name: tensor}}`, or the bare tensor for a single-input signature."""
    names = sig.inputs
    if isinstance(inputs, dict) and not _is_b64(inputs):
        if inputs.keys() != names.keys():
            _raise_key_mismatch("inputs", inputs.keys(), names.keys())
        return {name: to_array(name, inputs[name], info) for name, info in names.items()}
    if len(names) != 1:
        raise BadRequestError(f"'inputs' must be an object with inputs {sorted(names)}")
    name, info = next(iter(names.items()))
    return {name: to_array(name, inputs, info)}


def _raise_key_mismatch(where: str, given: Any, expected: Any) -> None:
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise BadRequestError(f"{where}: unknown input {unknown[0]!r}; inputs are {sorted(expected)}")
    missing = sorted(set(expected) - set(given))
    raise BadRequestError(f"{where}: missing input {missing[0]!r}; inputs are {sorted(expected)}")


# -- responses ------------------------------------------------------------------------------------
def _bytes_to_json(name: str, value: bytes) -> Any:
    # TF Serving's rule: outputs named *_bytes are base64; other strings are text.
    if not name.endswith("_bytes"):
        try:
            return value.decode()
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(value).decode()}


def _jsonable(name: str, array: np.ndarray) -> Any:
    if array.dtype.kind in _JSON_NUMPY_KINDS:
        return np.ascontiguousarray(array)
    if array.dtype.kind in "OS":
        out = np.empty(array.shape, dtype=object)
        for index, value in np.ndenumerate(array):
            out[index] = _bytes_to_json(name, value)
        return out.tolist()
    return array.tolist()


def _check_batch(outputs: Mapping[str, np.ndarray], rows: int) -> None:
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise BadRequestError(
                f"output {name!r} has shape {list(array.shape)}, not one row per instance; "
                "use the columnar 'inputs' format"
            )


def encode_predictions(outputs: Mapping[str, np.ndarray], rows: int) -> Any:
    """Row-format `predictions`: a list per row; a single output is not wrapped in a dict (as TF Serving)."""
    _check_batch(outputs, rows)
    if len(outputs) == 1:
        name, array = next(iter(outputs.items()))
        return _jsonable(name, array)
    columns = {name: _jsonable(name, array) for name, array in outputs.items()}
    return [{name: column[i] for name, column in columns.items()} for i in range(rows)]


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> Any:
    """Columnar `outputs`: the tensor itself for a single output, else a dict of them."""
    if len(outputs) == 1:
        name, array = next(iter(outputs.items()))
        return _jsonable(name, array)
    return {name: _jsonable(name, array) for name, array in outputs.items()}


def dumps(payload: Any) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


# -- classify / regress -----------------------------------------------------------------------------
def _feature(where: str, name: str, value: Any, hint: TensorInfo | None) -> feature_pb2.Feature:
    values = value if isinstance(value, list) else [value]
    if hint is not None:
        kind = "string" if hint.kind == "string" else "float" if hint.kind == "float" else "int"
    elif values and all(type(v) is int for v in values):
        kind = "int"
    elif values and all(type(v) is str or _is_b64(v) for v in values):
        kind = "string"
    else:
        kind = "float"
    field = f"{where}[{name!r}]"
    if kind == "string":
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=_scalars(field, values, _BYTES)))
    if kind == "int":
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=_scalars(field, values, _INT64)))
    return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=_scalars(field, values, _FLOAT)))


def encode_examples(payload: Mapping[str, Any], hints: Mapping[str, TensorInfo] | None) -> np.ndarray:
    """`{"examples": [...], "context": {...}}` -> serialized tf.train.Example protos, one per example.

    `hints` are the model's raw feature specs (from `serving_default`): they pick each feature's
    tf.Example list type, so `"trip_miles": 3` still becomes a float feature, and reject unknown features.
    """
    examples = payload.get("examples")
    if not isinstance(examples, list) or not examples:
        raise BadRequestError("'examples' must be a non-empty list of objects")
    context = payload.get("context", {})
    if not isinstance(context, dict):
        raise BadRequestError(f"'context' must be an object, got {_describe(context)}")

    def features(where: str, obj: dict[str, Any]) -> dict[str, feature_pb2.Feature]:
        out = {}
        for name, value in obj.items():
            hint = None
            if hints is not None:
                hint = hints.get(name)
                if hint is None:
                    raise BadRequestError(f"{where}: unknown feature {name!r}; features are {sorted(hints)}")
            out[name] = _feature(where, name, value, hint)
        return out

    shared = features("context", context)
    serialized = np.empty(len(examples), dtype=object)
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise BadRequestError(f"examples[{i}]: expected an object of features, got {_describe(example)}")
        feature_map = {**shared, **features(f"examples[{i}]", example)}
        proto = example_pb2.Example(features=feature_pb2.Features(feature=feature_map))
        serialized[i] = proto.SerializeToString()
    return serialized


def classification_results(outputs: Mapping[str, np.ndarray], rows: int) -> list[list[list[Any]]]:
    """TF Serving's classify `results`: per example a list of [label, score]; labels from a `classes`
    output when the signature has one, else "" (as TF Serving does for scores-only signatures)."""
    scores = outputs.get("scores")
    if scores is None:
        raise BadRequestError(f"signature has no 'scores' output (outputs are {sorted(outputs)}); use :predict")
    _check_batch(outputs, rows)
    scores = scores.reshape(rows, -1)
    classes = outputs.get("classes")
    if classes is not None:
        labels = [
            [_bytes_to_json("classes", c) if isinstance(c, bytes) else str(c) for c in row]
            for row in classes.reshape(rows, -1)
        ]
    else:
        labels = [[""] * scores.shape[1]] * rows
    # numpy float32 scalars: serialized by orjson with float32's shortest repr, like the other endpoints.
    return [
        [[label, s] for label, s in zip(row_labels, row, strict=True)]
        for row_labels, row in zip(labels, scores, strict=True)
    ]


def regression_results(outputs: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
    """TF Serving's regress `results`: one float per example, from `outputs`, `scores` or the only output."""
    name = next((n for n in ("outputs", "scores") if n in outputs), None)
    if name is None and len(outputs) == 1:
        name = next(iter(outputs))
    if name is None:
        raise BadRequestError(f"signature has no 'outputs' or 'scores' output (outputs are {sorted(outputs)})")
    values = outputs[name]
    if values.shape not in ((rows,), (rows, 1)) or values.dtype.kind != "f":
        raise BadRequestError(
            f"output {name!r} has shape {list(values.shape)}, expected [batch_size] or [batch_size, 1] floats"
        )
    return np.ascontiguousarray(values.reshape(rows))
