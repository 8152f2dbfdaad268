"""Reading Parquet row groups and TFRecord(tf.Example) files as flat Arrow tables, with their schemas."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.errors import InputDataError
from transforms._arrow_layout import is_list_type


# -- Parquet --------------------------------------------------------------------------------------
def parquet_schema(path: str) -> pa.Schema:
    """The Arrow schema stored in a Parquet file's footer."""
    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).schema_arrow


def same_parquet_schema(files: list[str]) -> pa.Schema:
    """The first file's schema, once every file is checked to have the same columns."""
    first = parquet_schema(files[0])
    for path in files[1:]:
        other = parquet_schema(path)
        if other.names != first.names:
            raise InputDataError(f"{path}: columns differ from {files[0]}: expected {first.names}, got {other.names}")
    return first


def parquet_row_groups(path: str) -> Iterator[tuple[str, int, int]]:
    """One (path, group, group + 1) unit per row group: the unit a reader reads."""
    with FileSystems.open(path) as f:
        n = pq.ParquetFile(f).num_row_groups
    for i in range(n):
        yield (path, i, i + 1)


def read_parquet_group(path: str, group: int) -> pa.Table:
    """One row group of a Parquet file, as stored."""
    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).read_row_group(group)


def conform(table: pa.Table, schema: pa.Schema, path: str) -> pa.Table:
    """`table`'s columns of `schema`, cast to its types; a table that does not fit is an error naming `path`."""
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputDataError(f"{path}: does not match the schema {schema}: {e}") from None


# -- TFRecord -------------------------------------------------------------------------------------
def tfrecord_schema(files: list[str]) -> pa.Schema:
    """Feature types from the first records of each file (up to 8 files × 10,000 records), decoded by tfx-bsl.

    A feature absent from every sampled record cannot be seen here; name it in `column_types`.
    """
    from tfx_bsl.coders.example_coder import ExamplesToRecordBatchDecoder

    fields: dict[str, pa.DataType] = {}
    for path in files[:8]:
        records = _tfrecords(path, limit=10000)
        if not records:
            raise InputDataError(f"{path}: TFRecord file holds no records; expected serialized tf.train.Example")
        try:
            batch = ExamplesToRecordBatchDecoder().DecodeBatch(records)
        except Exception as e:
            raise InputDataError(f"{path}: records are not serialized tf.train.Example: {e}") from None
        for f in batch.schema:
            if f.type != pa.null() and not pa.types.is_null(getattr(f.type, "value_type", f.type)):
                fields.setdefault(f.name, f.type)
    return pa.schema([pa.field(name, fields[name]) for name in sorted(fields)])


def _tfrecords(path: str, limit: int | None = None) -> list[bytes]:
    import tensorflow as tf

    compression = "GZIP" if path.endswith(".gz") else ""
    ds = tf.data.TFRecordDataset(path, compression_type=compression)
    if limit:
        ds = ds.take(limit)
    return [r.numpy() for r in ds]


def read_tfrecord(path: str, schema: pa.Schema) -> pa.Table:
    """Every tf.Example in a TFRecord file, decoded by tfx-bsl to `schema`'s features."""
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx_bsl.coders.example_coder import ExamplesToRecordBatchDecoder

    tfmd = schema_pb2.Schema()
    for f in schema:
        value = f.type.value_type if is_list_type(f.type) else f.type
        kind = (
            schema_pb2.INT
            if pa.types.is_integer(value)
            else schema_pb2.FLOAT
            if pa.types.is_floating(value)
            else schema_pb2.BYTES
        )
        tfmd.feature.add(name=f.name, type=kind)
    decoder = ExamplesToRecordBatchDecoder(tfmd.SerializeToString())
    records = _tfrecords(path)
    if not records:
        return pa.table({f.name: pa.array([], type=f.type) for f in schema})
    try:
        batch = decoder.DecodeBatch(records)
    except Exception as e:
        raise InputDataError(
            f"{path}: records are not serialized tf.train.Example matching {schema.names}: {e}"
        ) from None
    return pa.Table.from_batches([batch])
