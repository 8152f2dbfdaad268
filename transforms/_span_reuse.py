"""Spans an ExampleGen read before: an unchanged span's Parquet in the earlier Examples, read back, not parsed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES
from transforms._parquet_tfrecord import conform

# Examples properties: per span, its input fingerprint, the read units that hold it, bad records and
# rows per split; and a digest of the configuration the Parquet was written with.
SPAN_PARTS, CONFIG_DIGEST, REUSED_FROM = "span_parts", "config_digest", "spans_reused_from"
log = logging.getLogger(__name__)


def config_digest(config: Mapping[str, Any], versions: Sequence[str]) -> str:
    """What decides a span's Parquet besides its files: the configuration (without the range) and code."""
    text = json.dumps([config, list(versions)], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def previous_examples(store: Any, pipeline_name: str, component_id: str) -> dict[str, Any] | None:
    """The newest Examples of this ExampleGen that record their spans: a hint, not a cache-key input
    (a span read back is the same rows as the span parsed again)."""
    for a in store.latest_artifacts(EXAMPLES.name, pipeline_name, {"producer_component": component_id}):
        if SPAN_PARTS in a.properties:
            return {
                "id": a.id,
                "uri": a.uri,
                SPAN_PARTS: a.properties[SPAN_PARTS],
                CONFIG_DIGEST: a.properties.get(CONFIG_DIGEST),
            }
    return None


def reusable_parts(
    previous: Mapping[str, Any] | None, digest: str, fingerprints: Mapping[int, str], splits: Sequence[str]
) -> dict[int, list[tuple[str, str]]]:
    """For each span the previous Examples hold unchanged, its Parquet files as (split, path).

    A span is reused only when its files have the fingerprint they had, the configuration is the
    same, it had no bad record (those went to that run's quarantine), and its files are all there
    (their footers hold the rows it recorded); otherwise it is read from its raw files again.
    """
    if not previous or previous.get(CONFIG_DIGEST) != digest:
        return {}
    listing = {split: _parquet_files(artifact_io.join(previous["uri"], f"Split-{split}")) for split in splits}
    out: dict[int, list[tuple[str, str]]] = {}
    for span, fingerprint in fingerprints.items():
        entry = previous[SPAN_PARTS].get(str(span))
        if not entry or entry["fingerprint"] != fingerprint or entry.get("bad", 0):
            continue
        names = {artifact_io.example_part_name(i) for i in entry["units"]}
        parts = [(split, path) for split in splits for name, path in listing[split].items() if name in names]
        rows: dict[str, int] = {}
        for split, path in parts:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                rows[split] = rows.get(split, 0) + pq.ParquetFile(f).metadata.num_rows
        if all(rows.get(s, 0) == entry["rows"].get(s, 0) for s in splits):
            out[span] = parts
        else:
            log.warning(
                "span %s of %s is not all there (rows %s, recorded %s): reading it again",
                span,
                previous["uri"],
                rows,
                entry["rows"],
            )
    return out


def _parquet_files(directory: str) -> dict[str, str]:
    try:
        found = FileSystems.match([artifact_io.join(directory, "part-*.parquet")])[0].metadata_list
    except BeamIOError:
        return {}
    return {os.path.basename(m.path): m.path for m in found}


class ReadBack(beam.PTransform):
    """The Parquet parts of reused spans ({span: [(split, path)]}) as this run's part files and batches.

    Outputs: a PCollection of batches per split, and row counts (per split and per "span:split")
    under `counts_tag`. `span_units` says which part indices hold each span, numbered from
    `first_index` on.
    """

    def __init__(
        self,
        reused: Mapping[int, Sequence[tuple[str, str]]],
        *,
        first_index: int,
        schema: pa.Schema,
        uri: str,
        splits: Sequence[str],
        counts_tag: str,
    ):
        super().__init__()
        self._parts = [(split, path, s) for s, found in sorted(reused.items()) for split, path in found]
        self._first, self._schema, self._uri = first_index, schema, uri
        self.span_units: dict[int, list[int]] = {}
        for index, (_, _, s) in enumerate(self._parts, start=first_index):
            self.span_units.setdefault(s, []).append(index)
        self._splits, self._counts_tag = list(splits), counts_tag

    def expand(self, pbegin):
        counts_tag, splits = self._counts_tag, self._splits
        return (
            pbegin
            | "Parts" >> beam.Create(list(enumerate(self._parts, start=self._first)), reshuffle=False)
            | "Distribute" >> beam.Reshuffle()
            | "Read"
            >> beam.ParDo(_ReadBackParts(schema=self._schema, uri=self._uri, counts_tag=counts_tag)).with_outputs(
                counts_tag, *splits
            )
        )


class _ReadBackParts(beam.DoFn):
    """One earlier Parquet part (split, path, span) → its rows as this run's part file and batches of its split."""

    def __init__(self, *, schema: pa.Schema, uri: str, counts_tag: str):
        self._schema, self._uri, self._counts_tag = schema, uri, counts_tag

    def process(self, element):
        index, (split, path, span) = element
        with FileSystems.open(path, compression_type="uncompressed") as f:
            table = conform(pq.read_table(f), self._schema, path)  # a later span may have widened a column
        with FileSystems.create(
            artifact_io.join(self._uri, f"Split-{split}", artifact_io.example_part_name(index))
        ) as f:
            pq.write_table(table, f, compression="snappy")
        for batch in table.combine_chunks().to_batches():
            yield beam.pvalue.TaggedOutput(split, batch)
        yield beam.pvalue.TaggedOutput(self._counts_tag, {split: table.num_rows, f"{span}:{split}": table.num_rows})
