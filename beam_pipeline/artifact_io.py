"""Reading and writing artifact payloads, in the graph and from the driver.

Examples are Parquet files per split (`Split-<name>/part-*.parquet`) with list-typed columns, the
layout TFDV and tf.Transform read from Arrow directly. Protos (statistics, schema, anomalies) are
binary files named after their split.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam import coders
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import fingerprints, remote_fs
from beam_pipeline.artifacts import ANOMALIES, COMMIT_MARKER, EXAMPLES, SCHEMA, STATISTICS, Artifact, ArtifactType
from beam_pipeline.errors import InputDataError

STATS_FILE = "FeatureStats.pb"
SCHEMA_FILE = "schema.pbtxt"
ANOMALIES_FILE = "SchemaDiff.pb"


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as f:
        f.write(text.encode())


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def write_text_atomic(path: str, text: str) -> None:
    """`write_bytes_atomic` of the text's UTF-8 bytes."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader sees the whole file or none.

    Local renames are atomic; object stores copy whole objects, so the final name never holds a part.
    """
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temp) as f:
        f.write(data)
    try:
        FileSystems.rename([temp], [path])
    finally:
        if FileSystems.exists(temp):
            FileSystems.delete([temp])


def read_marker(uri: str) -> dict[str, Any] | None:
    """The commit marker of an artifact, or None while there is none (or only part of one)."""
    path = join(uri, COMMIT_MARKER)
    if not FileSystems.exists(path):
        return None
    try:
        marker = json.loads(read_bytes(path))
    except ValueError:  # a store without atomic writes may show a marker still being written
        return None
    return marker if isinstance(marker, dict) and "properties" in marker else None


def payload_files(uri: str) -> list[FileMetadata]:
    """Listing metadata of every payload file under `uri`, by path: the marker and temp files excluded."""
    matches = FileSystems.match([join(uri, "**")])[0].metadata_list
    return sorted(
        (m for m in matches if COMMIT_MARKER not in m.path[len(uri) :]),
        key=lambda m: m.path,
    )


def _relative(uri: str, m: FileMetadata) -> str:
    return m.path[len(uri) :].lstrip("/")


def manifest(uri: str, files: list[FileMetadata] | None = None) -> dict[str, int]:
    """Relative path -> size of each payload file (`files`, else listed now): recorded at commit, checked at reuse."""
    return {_relative(uri, m): m.size_in_bytes for m in (payload_files(uri) if files is None else files)}


def is_intact(uri: str) -> bool:
    """True when the artifact is committed and every file it was committed with is there, same size.

    Reads only the marker and the store's listing, never the payload, so checking a cached artifact
    stays cheap. (No exists(uri) first: on an object store a directory is a prefix, never an object.)
    """
    marker = read_marker(uri)
    if marker is None:
        return False
    recorded = marker.get("files")
    if recorded is None:  # committed before markers listed their files: existence is all we know
        return True
    return manifest(uri) == recorded


def fingerprint_tree(uri: str, files: list[FileMetadata] | None = None) -> str:
    """Content fingerprint of every payload file under `uri` (`files`, else listed now), by relative path.

    On an object store: each file's size and the checksum the store keeps (no byte downloaded). On
    local disk: the bytes themselves, read where they were just written (local reads are cheap and
    a local filesystem keeps no checksum).
    """
    files = payload_files(uri) if files is None else files
    h = hashlib.blake2b(digest_size=16)
    if remote_fs.is_remote(uri):
        stored = fingerprints.file_fingerprints(files)  # size and the store's checksum, from the listing
        for m in files:
            h.update(m.path[len(uri) :].encode())
            h.update(stored[m.path].encode())
        return h.hexdigest()
    for m in files:
        h.update(m.path[len(uri) :].encode())
        # The stored bytes: AUTO would inflate every .gz file just to hash it.
        with FileSystems.open(m.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# -- protos ------------------------------------------------------------------------------------------
def split_file(artifact_uri: str, split: str, name: str) -> str:
    return join(artifact_uri, f"Split-{split}", name)


def read_proto(path: str, message_type: type) -> Any:
    msg = message_type()
    data = read_bytes(path)
    if path.endswith(".pbtxt"):
        from google.protobuf import text_format

        text_format.Parse(data.decode(), msg)
    else:
        msg.ParseFromString(data)
    return msg


def write_proto(path: str, msg: Any) -> None:
    if path.endswith(".pbtxt"):
        from google.protobuf import text_format

        write_text(path, text_format.MessageToString(msg))
    else:
        with FileSystems.create(path) as f:
            f.write(msg.SerializeToString())


class WriteProto(beam.PTransform):
    """Write the single proto of a PCollection to `path`; emits the path once written."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, pcoll):
        path = self._path

        def write(msg):
            write_proto(path, msg)
            return path

        return pcoll | "Write" >> beam.Map(write)


# -- examples ----------------------------------------------------------------------------------------
def read_parquet_batches(pattern: str, batch_size: int = 65536) -> list[pa.RecordBatch]:
    batches: list[pa.RecordBatch] = []
    for m in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        with FileSystems.open(m.path) as f:
            batches.extend(pq.ParquetFile(f).iter_batches(batch_size=batch_size))
    return batches


class _ReadParquet(beam.DoFn):
    def process(self, path: str):
        with FileSystems.open(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=65536)


PARQUET = "parquet"


def _split_files(artifact: Artifact, split: str, span: int | None = None) -> list[str]:
    payload = artifact.properties.get("payload_format", PARQUET)
    if payload != PARQUET:
        raise InputDataError(
            f"examples at {artifact.uri} are {payload!r}; only Parquet examples are read back into the graph"
        )
    if split not in artifact.split_names:
        raise InputDataError(f"examples at {artifact.uri} have no split {split!r}; splits are {artifact.split_names}")
    paths = sorted(m.path for m in FileSystems.match([join(artifact.split_uri(split), "*.parquet")])[0].metadata_list)
    if span is None:
        return paths
    # ExampleGen over spans records which of its part files hold each span.
    entry = artifact.properties.get("span_parts", {}).get(str(span))
    if entry is None:
        raise InputDataError(
            f"examples at {artifact.uri} record no span {span}; spans: {artifact.properties.get('spans')}"
        )
    names = {example_part_name(i) for i in entry["units"]}
    return [p for p in paths if p.rsplit("/", 1)[-1] in names]


def example_part_name(index: int) -> str:
    """The name of ExampleGen's Parquet part file of read unit `index` (one per unit and split)."""
    return f"part-{index:05d}.parquet"


class ReadSplit(beam.PTransform):
    """The RecordBatches of one split (of one span, with `span`) of a Parquet Examples artifact, read once it exists.

    Input: a PCollection holding the Artifact (a commit signal, or a cached artifact), so the read
    starts only after the commit. Only file names are shuffled, to spread the files over workers:
    the data streams from storage into the consumer's fused stage and is never held whole, as an
    in-graph shuffle of the batches would be on a runner that buffers between stages.
    """

    def __init__(self, split: str, span: int | None = None):
        super().__init__()
        self._split, self._span = split, span

    def expand(self, artifact: beam.PCollection) -> beam.PCollection:
        return (
            artifact
            | "List" >> beam.FlatMap(_split_files, self._split, self._span)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadParquet())
        )


class _ParquetWriter:
    """One shard: a Parquet file of the batches Beam hands it, its schema the first batch's."""

    def __init__(self, raw: Any):
        self._raw, self._writer, self._schema = raw, None, None

    def write(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch])
        if self._writer is None:
            self._schema = batch.schema
            self._writer = pq.ParquetWriter(self._raw, self._schema, compression="snappy")
        elif batch.schema != self._schema:
            table = table.select(self._schema.names).cast(self._schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is None:  # an empty split: a valid file of no rows
            pq.write_table(pa.table({}), self._raw)
        else:
            self._writer.close()
        self._raw.close()


class _ParquetBatchSink(filebasedsink.FileBasedSink):
    """RecordBatches to Parquet shards, with Beam's temporary files and finalization (a retried
    bundle never leaves its rows twice)."""

    def __init__(self, file_path_prefix: str):
        super().__init__(
            file_path_prefix,
            coder=coders.BytesCoder(),  # unused: write_record takes the batch itself
            file_name_suffix=".parquet",
            mime_type="application/octet-stream",
            compression_type=CompressionTypes.UNCOMPRESSED,
        )

    def open(self, temp_path: str) -> Any:
        return _ParquetWriter(super().open(temp_path))

    def write_record(self, file_handle: Any, value: pa.RecordBatch) -> None:
        file_handle.write(value)


class WriteBatchesToParquet(beam.PTransform):
    """RecordBatches to Parquet files `<prefix>-SSSSS-of-NNNNN.parquet` (the layout `ReadSplit` reads).

    Beam's FileBasedSink writes temporary files and renames them once the write is finalized, so a
    retried bundle never leaves its rows twice. Each file's schema is its first batch's; later
    batches are conformed to it. Output: the written file names.
    """

    def __init__(self, file_path_prefix: str):
        super().__init__()
        self._sink = _ParquetBatchSink(file_path_prefix)

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return batches | beam.io.Write(self._sink)


def rereadable(payload_format: str | None) -> bool:
    """Whether Examples can be read back from their files by `ReadSplit` (else they live in the graph only)."""
    return payload_format == PARQUET


def _load_split_protos(filename: str, message_path: str):
    def load(p: beam.Pipeline, artifact: Artifact, label: str):
        module, name = message_path.rsplit(".", 1)
        message_type = getattr(__import__(module, fromlist=[name]), name)
        return {
            split: p
            | f"{label}.Read[{split}]"
            >> beam.Create([read_proto(split_file(artifact.uri, split, filename), message_type)])
            for split in artifact.split_names
        }

    return load


def read_schema(artifact: Artifact) -> Any:
    """The Schema proto of a Schema artifact."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    return read_proto(join(artifact.uri, SCHEMA_FILE), schema_pb2.Schema)


def _load_schema(p: beam.Pipeline, artifact: Artifact, label: str):
    return p | f"{label}.Read" >> beam.Create([read_schema(artifact)])


# How a cached artifact of each data type is put back into the graph. File-only types need no loader:
# downstream components receive the Artifact itself. Examples come back through `ReadSplit`, split by
# split, where the compiler wires a consumer's reads.
LOADERS = {
    STATISTICS.name: _load_split_protos(
        STATS_FILE, "tensorflow_metadata.proto.v0.statistics_pb2.DatasetFeatureStatisticsList"
    ),
    SCHEMA.name: _load_schema,
    ANOMALIES.name: _load_split_protos(ANOMALIES_FILE, "tensorflow_metadata.proto.v0.anomalies_pb2.Anomalies"),
}


def has_data_value(atype: ArtifactType) -> bool:
    return atype.name == EXAMPLES.name or atype.name in LOADERS
