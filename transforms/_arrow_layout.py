"""Flat Arrow columns to the large_list layout that TFDV and tf.Transform read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
