"""ExampleGen: read raw data once into Arrow RecordBatches, split deterministically, materialize Parquet."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io, caching
from beam_pipeline.artifacts import EXAMPLES
from beam_pipeline.dsl import Component
from beam_pipeline.errors import PipelineDefinitionError
from transforms._arrow_layout import list_schema, to_list_batch
from transforms._csv_blocks import BadRecord, byte_ranges, parse_csv_block
from transforms._input_files import match_metadata
from transforms._input_plan import PLAN_VERSION, input_fingerprint, plan_input
from transforms._parquet_tfrecord import (
    conform,
    parquet_row_groups,
    read_parquet_group,
    read_tfrecord,
)
from transforms._span_reuse import (
    CONFIG_DIGEST,
    REUSED_FROM,
    SPAN_PARTS,
    ReadBack,
    config_digest,
    previous_examples,
    reusable_parts,
)
from transforms._spans import RangeConfig, SpanRange, Spans, check_pattern, has_spans
from transforms._spans import select as select_spans
from transforms._split_hash import assign_splits, row_hashes

# to_list_batch: ExampleGen's layout, for the transforms used alone.
__all__ = ["ExampleGen", "RangeConfig", "ReadExamples", "SpanRange", "to_list_batch"]

FORMATS = ("csv", "parquet", "tfrecord")
QUARANTINE_DIR = "Quarantine"


class ExampleGen(Component):
    """Ingest CSV, Parquet or TFRecord(tf.Example) files matched by glob patterns.

    Output `examples`: `{split: PCollection[pa.RecordBatch]}` with large_list columns, and per split
    Parquet files under `<uri>/Split-<name>/`. Rows go to splits by a content hash (or by hashing
    `partition_feature`), so the same row lands in the same split on every run and every runner.
    """

    OUTPUTS = {"examples": EXAMPLES}

    def __init__(
        self,
        *,
        input_base: str | Sequence[str],
        format: str = "csv",
        splits: Mapping[str, int] | None = None,
        partition_feature: str | None = None,
        column_types: Mapping[str, str] | None = None,
        on_bad_record: str = "error",
        block_size_bytes: int = 32 << 20,
        range_config: RangeConfig | None = None,
        component_id: str | None = None,
    ):
        super().__init__(
            inputs={},
            params=_params(
                input_base,
                format,
                splits,
                partition_feature,
                column_types,
                on_bad_record,
                block_size_bytes,
                range_config,
            ),
            component_id=component_id,
        )

    # -- compile time (recomputed on every call: a Pipeline object may run again on new files) --------
    @property
    def files(self) -> list[str]:
        return [m.path for m in _matched(self.params)[0]]

    def external_fingerprint(self, inputs=None) -> str:
        """The input files' content, from the store's checksums or a stat-keyed digest memo: an
        unchanged input is not read (see `beam_pipeline.fingerprints`). With spans, only the files
        of the spans this run reads: a new span does not change a static range's key."""
        return input_fingerprint(_matched(self.params)[0])

    def cache_config(self) -> dict[str, Any]:
        """Without the range of spans: the files it picks are in the external fingerprint, so a static
        range over yesterday's span reuses yesterday's latest-span run."""
        return {k: v for k, v in self.exec_properties().items() if k != "range_config"}

    def flat_schema(self) -> pa.Schema:
        """Column types, decided at compile time and enforced on every block."""
        return plan_input(self.params, *_matched(self.params))[0]

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        found, spans = _matched(self.params)
        files = [m.path for m in found]
        schema, notes = plan_input(self.params, found, spans)
        return {
            "examples": {
                "arrow_schema": list_schema(schema),
                "splits": list(self.params["splits"]),
                "payload_format": artifact_io.PARQUET,
                # What expand() reads: this run's files and types, not an earlier run's.
                "files": files,
                "flat_schema": schema,
                "column_type_notes": notes,
                "spans": spans.properties() if spans else {},
                "span_files": {s: [m.path for m in spans.files[s]] for s in spans.spans} if spans else {},
                "span_fingerprints": {s: input_fingerprint(spans.files[s]) for s in spans.spans} if spans else {},
                "config_digest": self._config_digest() if spans else None,
            }
        }

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """With spans: the previous Examples of this ExampleGen, whose unchanged spans are read back."""
        if self.params.get("range_config") is None:
            return {}
        previous = previous_examples(store, pipeline_name, self.id)
        return {"previous_examples": previous} if previous else {}

    def _config_digest(self) -> str:
        return config_digest(self.cache_config(), [self.VERSION, PLAN_VERSION, *caching.library_versions()])

    # -- graph ---------------------------------------------------------------------------------------
    def expand(self, pbegin):
        uri = self.ctx.output_uri("examples")
        static = self.ctx.output_static["examples"]
        notes = static["column_type_notes"]
        splits = list(self.params["splits"])
        span_files, digest = static["span_files"], static["config_digest"]
        previous = self.ctx.resolved.get("previous_examples")
        reused = reusable_parts(previous, digest, static["span_fingerprints"], splits) if span_files else {}
        if span_files:
            units = [(u, s) for s, files in span_files.items() if s not in reused for u in _units(self.params, files)]
        else:
            units = [(u, None) for u in _units(self.params, static["files"])]
        tagged = _read_splits(pbegin, self.params, units, static["flat_schema"], uri)
        outputs = {name: [tagged[name]] for name in [_COUNTS, *splits]}
        span_units = {s: [i for i, (_, span) in enumerate(units) if span == s] for s in span_files}
        if reused:
            read_back = ReadBack(
                reused,
                first_index=len(units),
                schema=list_schema(static["flat_schema"]),
                uri=uri,
                splits=splits,
                counts_tag=_COUNTS,
            )
            back = pbegin | "ReadBack" >> read_back
            for s, indices in read_back.span_units.items():
                span_units[s].extend(indices)
            for name in outputs:
                outputs[name].append(back[name])
        merged = {
            name: pcolls[0] if len(pcolls) == 1 else pcolls | f"All[{name}]" >> beam.Flatten()
            for name, pcolls in outputs.items()
        }
        spans_out = dict(static["spans"])
        if span_files:
            spans_out[CONFIG_DIGEST] = digest
            spans_out[REUSED_FROM] = {str(s): previous["id"] for s in sorted(reused)}
        counts = merged[_COUNTS] | "SumCounts" >> beam.CombineGlobally(_sum_counts)
        properties = counts | "Properties" >> beam.Map(
            lambda c, names=tuple(splits), notes=tuple(notes), spans=spans_out: {
                "split_names": list(names),
                "row_counts": {s: c.get(s, 0) for s in names},
                "bad_records": c.get(_BAD, 0),
                "payload_format": artifact_io.PARQUET,
                "column_type_notes": list(notes),
                **spans,
                **_span_parts(c, names, span_units, static["span_fingerprints"]),
            }
        )
        self.ctx.publish("examples", properties)
        return {"examples": {s: merged[s] for s in splits}}


class ReadExamples(beam.PTransform):
    """CSV, Parquet or TFRecord (tf.Example) files as RecordBatches per split: ExampleGen's data work alone.

    Example::

        examples = p | ReadExamples("data/*.csv", splits={"train": 2, "eval": 1})
        stats = examples["train"] | SplitStatistics("train")

    Output: `{split: PCollection[RecordBatch]}` with large_list columns (`arrow_schema`). Rows go to
    splits by a hash of their content (or of `partition_feature`), the same on every run and runner.
    Column types are decided when the transform is built (for CSV, a scan of every row, remembered
    by the files' fingerprint) and enforced on every block. A bad record fails the read naming its
    file and line (`on_bad_record="error"`), or is dropped (`"skip"`; ExampleGen also quarantines
    and counts them).
    """

    def __init__(
        self,
        input_base: str | Sequence[str],
        *,
        format: str = "csv",
        splits: Mapping[str, int] | None = None,
        partition_feature: str | None = None,
        column_types: Mapping[str, str] | None = None,
        on_bad_record: str = "error",
        block_size_bytes: int = 32 << 20,
        range_config: RangeConfig | None = None,
    ):
        super().__init__()
        self._params = _params(
            input_base, format, splits, partition_feature, column_types, on_bad_record, block_size_bytes, range_config
        )
        found, spans = _matched(self._params)
        self._files = [m.path for m in found]
        self._schema = plan_input(self._params, found, spans)[0]

    @property
    def arrow_schema(self) -> pa.Schema:
        """The output batches' schema (large_list columns)."""
        return list_schema(self._schema)

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
        units = [(u, None) for u in _units(self._params, self._files)]
        tagged = _read_splits(pbegin, self._params, units, self._schema, uri=None)
        return {s: tagged[s] for s in self._params["splits"]}


def _params(
    input_base, format, splits, partition_feature, column_types, on_bad_record, block_size_bytes, range_config
) -> dict:
    """The validated configuration shared by ExampleGen and ReadExamples."""
    patterns = [input_base] if isinstance(input_base, str) else list(input_base)
    spanned = [p for p in patterns if has_spans(p)]
    if spanned:
        if len(patterns) > 1:
            raise PipelineDefinitionError(f"input_base {patterns}: a pattern with spans must be the only one")
        check_pattern(spanned[0])
    elif range_config is not None:
        raise PipelineDefinitionError(
            f"range_config needs spans in input_base (e.g. data/span-{{SPAN}}/*.csv); got {patterns}"
        )
    if format not in FORMATS:
        raise PipelineDefinitionError(f"ExampleGen format {format!r}: expected one of {FORMATS}")
    if on_bad_record not in ("error", "skip"):
        raise PipelineDefinitionError(f"on_bad_record={on_bad_record!r}: expected 'error' or 'skip'")
    splits = dict(splits or {"train": 2, "eval": 1})
    if not splits or any(not isinstance(w, int) or w <= 0 for w in splits.values()):
        raise PipelineDefinitionError(
            f"splits {splits}: expected positive integer weights, e.g. {{'train': 2, 'eval': 1}}"
        )
    spans = {"range_config": dataclasses.asdict(range_config or RangeConfig.latest())} if spanned else {}
    return {
        "input_base": patterns,
        **spans,  # only with spans, so the configuration (and cache key) of other inputs is as it was
        "format": format,
        "splits": splits,
        "partition_feature": partition_feature,
        "column_types": dict(column_types or {}),
        "on_bad_record": on_bad_record,
        "block_size_bytes": block_size_bytes,
    }


def _matched(params: Mapping[str, Any]) -> tuple[list[FileMetadata], Spans | None]:
    """The files this run reads (with spans: those of the spans its range picks) and the spans."""
    if params.get("range_config") is None:
        return match_metadata(params["input_base"]), None
    return select_spans(params["input_base"][0], RangeConfig(**params["range_config"]))


def _units(params: Mapping[str, Any], files: list[str]) -> list[tuple[str, int, int]]:
    """What one read handles: a CSV byte range, a Parquet row group, or a whole TFRecord file."""
    fmt = params["format"]
    if fmt == "csv":
        return [r for f in files for r in byte_ranges(f, params["block_size_bytes"])]
    if fmt == "parquet":
        return [r for f in files for r in parquet_row_groups(f)]
    return [(f, 0, 0) for f in files]


def _span_parts(counts: Mapping[str, int], splits, span_units, fingerprints) -> dict[str, Any]:
    """Per span, what a later run needs to read it back (see `_span_reuse`)."""
    if not span_units:
        return {}
    parts = {
        str(s): {
            "fingerprint": fingerprints[s],
            "units": units,
            "bad": counts.get(f"{s}:{_BAD}", 0),
            "rows": {split: counts.get(f"{s}:{split}", 0) for split in splits},
        }
        for s, units in span_units.items()
    }
    return {SPAN_PARTS: parts}


def _read_splits(pbegin, params: Mapping[str, Any], units: list, schema: pa.Schema, uri: str | None):
    """The tagged outputs of reading every unit ((path, start, end), span): one per split, plus `_COUNTS`."""
    read = _ReadSplitWrite(
        fmt=params["format"],
        schema=schema,
        splits=dict(params["splits"]),
        partition_feature=params["partition_feature"],
        on_bad_record=params["on_bad_record"],
        uri=uri,
    )
    return (
        pbegin
        | "Units" >> beam.Create([(i, u, span) for i, (u, span) in enumerate(units)], reshuffle=False)
        | "Distribute" >> beam.Reshuffle()
        | "ReadSplitWrite" >> beam.ParDo(read).with_outputs(_COUNTS, *params["splits"])
    )


_COUNTS, _BAD = "__counts__", "__bad__"


def _sum_counts(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


class _ReadSplitWrite(beam.DoFn):
    """One unit of input (byte range / row group / file) → RecordBatch per split (+ Parquet part file under `uri`)."""

    def __init__(self, *, fmt, schema, splits, partition_feature, on_bad_record, uri):
        self._fmt, self._schema, self._splits = fmt, schema, splits
        self._partition, self._on_bad, self._uri = partition_feature, on_bad_record, uri

    def process(self, element):
        index, (path, start, end), span = element
        bad: list[BadRecord] = []
        if self._fmt == "csv":
            table, bad = parse_csv_block(path, start, end, self._schema, self._on_bad)
        elif self._fmt == "parquet":
            table = conform(read_parquet_group(path, start), self._schema, path)
        else:
            table = read_tfrecord(path, self._schema)
        counts: dict[str, int] = {_BAD: len(bad)}
        if span is not None:  # per span too, so a later run knows what it may read back
            counts[f"{span}:{_BAD}"] = len(bad)
        if bad and self._uri is not None:
            artifact_io.write_text(
                artifact_io.join(self._uri, QUARANTINE_DIR, f"part-{index:05d}.txt"),
                "".join(b.render() + "\n" for b in bad),
            )
        if table.num_rows:
            hashes = row_hashes(table, [self._partition] if self._partition else None)
            for split, rows in assign_splits(hashes, self._splits).items():
                counts[split] = len(rows)
                if span is not None:
                    counts[f"{span}:{split}"] = len(rows)
                if len(rows) == 0:
                    continue
                # Take on the flat columns, then build lists: cheaper than taking from list arrays.
                part = to_list_batch(table.take(pa.array(rows)) if len(rows) != table.num_rows else table)
                if self._uri is not None:  # one file per unit: a retried bundle rewrites its own file
                    path_out = artifact_io.join(self._uri, f"Split-{split}", artifact_io.example_part_name(index))
                    with FileSystems.create(path_out) as f:
                        pq.write_table(pa.Table.from_batches([part]), f, compression="snappy")
                yield beam.pvalue.TaggedOutput(split, part)
        yield beam.pvalue.TaggedOutput(_COUNTS, counts)
