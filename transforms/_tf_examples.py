"""RecordBatch rows as serialized tf.Examples, the input of a model's `from_examples` signature."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def serialize_rows(encoder: object, batch: pa.RecordBatch) -> list[bytes]:
    """One serialized tf.Example per row, by tfx_bsl's `RecordBatchToExamplesEncoder`.

    Missing values arrive as null lists; an empty list (possible from Parquet or TFRecord input) is
    encoded as null too, i.e. a feature without a value list, which tf.io.parse_example treats as
    missing: a FixedLenFeature then gets its default instead of failing on zero values.
    """
    columns = []
    for column in batch.columns:
        empty = pc.fill_null(pc.equal(pc.list_value_length(column), 0), True)
        columns.append(pc.if_else(empty, pa.scalar(None, column.type), column))
    return encoder.encode(pa.RecordBatch.from_arrays(columns, schema=batch.schema))
