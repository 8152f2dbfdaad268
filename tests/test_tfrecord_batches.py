"""WriteBatchesToTFRecord in a bare Beam pipeline: every row back as the same tf.Example, gzip or not."""

from __future__ import annotations

import glob
import gzip

import pyarrow as pa
import pytest
import tensorflow as tf
from tfx_bsl.coders import example_coder

from tests.helpers import in_process_pipeline
from transforms._tfrecord_batches import WriteBatchesToTFRecord


def _batches() -> list[pa.RecordBatch]:
    return [
        pa.RecordBatch.from_arrays(
            [
                pa.array([[i, i + 1] for i in range(start, start + 500)], pa.large_list(pa.int64())),
                pa.array([[f"v{i}".encode()] for i in range(start, start + 500)], pa.large_list(pa.large_binary())),
            ],
            ["ints", "bytes"],
        )
        for start in range(0, 3000, 500)
    ]


@pytest.mark.parametrize("suffix, compression", [(".gz", "GZIP"), ("", "")])
def test_every_row_comes_back_as_the_same_example(tmp_path, suffix, compression):
    import apache_beam as beam

    p = in_process_pipeline()
    _ = p | beam.Create(_batches()) | WriteBatchesToTFRecord(str(tmp_path / "part"), file_name_suffix=suffix)
    p.run().wait_until_finish()
    files = sorted(glob.glob(str(tmp_path / f"part-*-of-*{suffix}")))
    assert files
    if compression:
        with gzip.open(files[0]) as f:  # a standard gzip stream, not only something tf.data accepts
            assert f.read(1)
    written = [_canonical(r.numpy()) for r in tf.data.TFRecordDataset(files, compression_type=compression)]
    expected = [_canonical(e) for b in _batches() for e in example_coder.RecordBatchToExamples(b)]
    assert sorted(written) == sorted(expected)


def _canonical(record: bytes) -> bytes:
    """The example's bytes with its feature map in key order (proto maps serialize in any order)."""
    return tf.train.Example.FromString(record).SerializeToString(deterministic=True)


def test_a_path_is_required():
    with pytest.raises(ValueError, match="file_path_prefix must name where to write"):
        WriteBatchesToTFRecord("")
