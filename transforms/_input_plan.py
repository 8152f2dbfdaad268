"""ExampleGen's input plan at compile time: column types from the data, remembered by the files' fingerprint."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
from apache_beam.io.filesystem import FileMetadata

from beam_pipeline import caching, fingerprints
from beam_pipeline.errors import InputDataError
from transforms._csv_scan import CsvScan, merge_scans, scan_csv
from transforms._parquet_tfrecord import same_parquet_schema, tfrecord_schema
from transforms._spans import Spans


def plan_input(
    params: Mapping[str, Any], found: list[FileMetadata], spans: Spans | None = None
) -> tuple[pa.Schema, list[str]]:
    """(flat schema, notes on widened column types) of the files, remembered by their fingerprint.

    Finding the types reads data (every row of a CSV, the first records of TFRecords); an input
    whose fingerprint is unchanged gets the types found last time, without reading a byte. CSV
    spans are scanned and remembered one by one, then merged: a window's new day is the only one
    a run scans.
    """
    fmt, files = params["format"], [m.path for m in found]
    if spans is not None and fmt == "csv":
        scans = [_span_scan(params, span, spans.files[span]) for span in spans.spans]
        merged = merge_scans(scans, [f"span {span}" for span in spans.spans])
        schema, notes = merged.schema, list(merged.notes)
    else:
        name = json.dumps([fmt, params["input_base"], params["column_types"]])
        valid_for = json.dumps([PLAN_VERSION, input_fingerprint(found), caching.library_versions()])
        known = fingerprints.recall(_INPUT_SCHEMAS, name, valid_for)
        if known is not None:
            schema, notes = _decode_schema(known["schema"]), known["notes"]
        else:
            schema, notes = _find_schema(fmt, files, params["column_types"])
            fingerprints.remember(_INPUT_SCHEMAS, name, valid_for, {"schema": _encode_schema(schema), "notes": notes})
    feature = params["partition_feature"]
    if feature and feature not in schema.names:
        raise InputDataError(f"partition_feature {feature!r} is not a column of {files[0]}: {schema.names}")
    return schema, notes


def _span_scan(params: Mapping[str, Any], span: int, found: list[FileMetadata]) -> CsvScan:
    """One span's CSV type scan, remembered by that span's files."""
    name = json.dumps(["csv", params["input_base"], params["column_types"], span])
    valid_for = json.dumps([PLAN_VERSION, input_fingerprint(found), caching.library_versions()])
    known = fingerprints.recall(_INPUT_SCHEMAS, name, valid_for)
    if known is not None:
        return CsvScan(_decode_schema(known["schema"]), tuple(known["notes"]), tuple(map(tuple, known["ranks"])))
    scan = scan_csv([m.path for m in found], params["column_types"])
    value = {"schema": _encode_schema(scan.schema), "notes": list(scan.notes), "ranks": [list(r) for r in scan.ranks]}
    fingerprints.remember(_INPUT_SCHEMAS, name, valid_for, value)
    return scan


def _encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


_INPUT_SCHEMAS = "input-schemas"
# Bump when finding the types changes what it finds for the same bytes (libraries count on their own).
PLAN_VERSION = "1"


def input_fingerprint(found: list[FileMetadata]) -> str:
    """One fingerprint of the files' paths and contents (see `beam_pipeline.fingerprints`)."""
    per_file = fingerprints.file_fingerprints(found)
    h = hashlib.blake2b(digest_size=16)
    for m in found:
        h.update(m.path.encode())
        h.update(per_file[m.path].encode())
    return h.hexdigest()


def _find_schema(fmt: str, files: list[str], column_types: dict[str, str]) -> tuple[pa.Schema, list[str]]:
    """(flat schema, notes) from the data: the CSV type scan, Parquet footers or sampled TFRecords."""
    if fmt == "csv":
        scan = scan_csv(files, column_types)
        return scan.schema, list(scan.notes)
    if fmt == "parquet":
        return same_parquet_schema(files), []
    return tfrecord_schema(files), []
