"""Flat Arrow columns to the large_list layout that TFDV and tf.Transform read."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_pipeline.errors import InputDataError

NUMERIC_TO_LIST = {
    pa.int8(): pa.int64(),
    pa.int16(): pa.int64(),
    pa.int32(): pa.int64(),
    pa.int64(): pa.int64(),
    pa.uint8(): pa.int64(),
    pa.uint16(): pa.int64(),
    pa.uint32(): pa.int64(),
    pa.uint64(): pa.int64(),
    pa.bool_(): pa.int64(),
    pa.float16(): pa.float32(),
    pa.float32(): pa.float32(),
    pa.float64(): pa.float32(),
}


def is_list_type(t: pa.DataType) -> bool:
    """True for list and large_list types."""
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def to_list_batch(table: pa.Table) -> pa.RecordBatch:
    """Flat columns → large_list columns (missing = null list): the layout TFDV and TFT read."""
    arrays, fields = [], []
    for name, col in zip(table.column_names, table.columns, strict=False):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if is_list_type(arr.type):
            arrays.append(
                arr if pa.types.is_large_list(arr.type) else arr.cast(pa.large_list(_value_type(arr.type.value_type)))
            )
            fields.append(pa.field(name, arrays[-1].type))
            continue
        value_type = _value_type(arr.type)
        valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(arr) + 1, dtype=np.int64)
        np.cumsum(valid, out=offsets[1:])
        values = pc.drop_null(arr).cast(value_type)
        # A missing value is a null list (not an empty one), as tfx-bsl's decoders make it, so TFDV
        # counts it in num_missing and SchemaGen infers presence from it.
        mask = None if arr.null_count == 0 else np.concatenate([~valid, [False]])
        arrays.append(pa.LargeListArray.from_arrays(pa.array(offsets, mask=mask), values))
        fields.append(pa.field(name, pa.large_list(value_type)))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _value_type(t: pa.DataType) -> pa.DataType:
    if t in NUMERIC_TO_LIST:
        return NUMERIC_TO_LIST[t]
    return pa.large_binary()


def list_schema(flat: pa.Schema) -> pa.Schema:
    """The schema `to_list_batch` gives a table with schema `flat`."""
    return pa.schema([pa.field(f.name, pa.large_list(_value_type(f.type))) for f in flat])


def conform_to_schema(batch: pa.RecordBatch, schema: Any, where: str) -> pa.RecordBatch:
    """`batch` with each column a TFMD `schema` names cast to the schema's type (INT, FLOAT, BYTES).

    For data typed by another ExampleGen than the model's: a day whose `fare` holds only whole
    numbers reads as INT there. A column the schema names and the batch lacks, or a value that does
    not convert (1.5 to INT), is an InputDataError naming `where` and the column.
    """
    from tensorflow_metadata.proto.v0 import schema_pb2

    value_types = {schema_pb2.INT: pa.int64(), schema_pb2.FLOAT: pa.float32(), schema_pb2.BYTES: pa.large_binary()}
    names = batch.schema.names
    missing = [f.name for f in schema.feature if f.name not in names]
    if missing:
        raise InputDataError(f"{where}: missing columns {missing}, which the schema names; the columns are {names}")
    wanted = {f.name: (f.type, value_types[f.type]) for f in schema.feature if f.type in value_types}
    arrays = []
    for field, column in zip(batch.schema, batch.columns, strict=True):
        schema_type, value_type = wanted.get(field.name, (None, None))
        if value_type is None or field.type.value_type == value_type:
            arrays.append(column)
            continue
        try:
            # Arrow converts between numbers and strings, not binary: go through large_string.
            if pa.types.is_large_binary(field.type.value_type) or value_type == pa.large_binary():
                column = column.cast(pa.large_list(pa.large_string()))
            arrays.append(column.cast(pa.large_list(value_type)))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputDataError(
                f"{where}: column {field.name!r} holds {field.type.value_type} values that do not convert to the "
                f"schema's type {schema_pb2.FeatureType.Name(schema_type)}: {e}"
            ) from None
    return pa.RecordBatch.from_arrays(arrays, names=names)
