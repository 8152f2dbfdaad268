"""CSV column types from every row at compile time, in one streaming pass per file (none when every type is given)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv

from beam_pipeline.errors import InputDataError
from transforms._csv_blocks import byte_ranges, parse_csv_block
from transforms._csv_values import EXPECTED, convert_options, converts, unconvertible
from transforms._input_files import csv_header, open_data

SCAN_BLOCK_BYTES = 8 << 20  # the type scan's streaming block: big enough for any sane row
log = logging.getLogger(__name__)

_NULL, _INT, _FLOAT, _STRING = range(4)
_RANK_TYPES = {_NULL: pa.string(), _INT: pa.int64(), _FLOAT: pa.float64(), _STRING: pa.string()}
_RANK_NAMES = {_INT: "int64", _FLOAT: "float64", _STRING: "string"}


@dataclasses.dataclass(frozen=True)
class CsvScan:
    """What one pass over every byte found: column types, why a column was widened, and each scanned
    column's narrowest type (None: no value seen yet), so scans of separate files can be merged."""

    schema: pa.Schema
    notes: tuple[str, ...]
    ranks: tuple[tuple[str, int], ...] = ()


def merge_scans(scans: Sequence[CsvScan], labels: Sequence[str] | None = None) -> CsvScan:
    """The scan of all the files of `scans` at once: each column as wide as its widest scan says.

    A column's type from every row is the narrowest type holding every file's values, so scanning
    files one by one (a span at a time, each remembered) and merging gives the same types. A column
    one scan (`labels` names them) widens beyond the earlier ones gets a note, as within a file.
    """
    labels = list(labels or [f"scan {i + 1}" for i in range(len(scans))])
    first = scans[0]
    for other, label in zip(scans[1:], labels[1:], strict=True):
        if other.schema.names != first.schema.names:
            raise InputDataError(
                f"{label}: columns differ from {labels[0]}: {other.schema.names}, not {first.schema.names}"
            )
    ranks: dict[str, int] = {}
    since: dict[str, str] = {}
    notes = [note for scan in scans for note in scan.notes]
    for scan, label in zip(scans, labels, strict=True):
        for name, rank in scan.ranks:
            old = ranks.get(name, _NULL)
            if rank > old and old != _NULL:
                notes.append(
                    f"column {name!r} read as {_RANK_NAMES[rank]}: {label} holds {_RANK_NAMES[rank]} values, "
                    f"{since[name]} only {_RANK_NAMES[old]} ones"
                )
            if rank > old:
                ranks[name], since[name] = rank, label
    fields = [
        pa.field(f.name, _RANK_TYPES[ranks.get(f.name, _NULL)] if f.name in dict(first.ranks) else f.type)
        for f in first.schema
    ]
    return CsvScan(pa.schema(fields), tuple(notes), tuple(ranks.items()))


class _ColumnType:
    """The narrowest of int64 → float64 → string that holds every value seen so far."""

    def __init__(self, name: str):
        self.name, self.rank, self.notes = name, _NULL, []

    def observe(self, values: pa.Array, path: str, rows_before: int) -> None:
        while self.rank != _STRING:
            if self.rank == _NULL:
                valid = values.is_valid().to_numpy(zero_copy_only=False)
                if not valid.any():
                    return
                self.rank = self._rank_of(values.slice(int(np.argmax(valid)), 1))
                continue
            target = _RANK_TYPES[self.rank]
            if converts(values, target):
                return
            i = int(np.argmax(unconvertible(values, target)))
            wider = _FLOAT if self.rank == _INT and converts(values.slice(i, 1), pa.float64()) else _STRING
            self.notes.append(
                f"column {self.name!r} read as {_RANK_NAMES[wider]}: {path} data row {rows_before + i + 1} "
                f"holds {values[i].as_py()!r}, not {EXPECTED[str(target)]} like the rows before it"
            )
            self.rank = wider

    @staticmethod
    def _rank_of(value: pa.Array) -> int:
        if converts(value, pa.int64()):
            return _INT
        return _FLOAT if converts(value, pa.float64()) else _STRING


class _QuoteCounting:
    """A read-only stream that counts the quotes passing through it, to tell a stray quote from a clean file."""

    closed = False

    def __init__(self, f: BinaryIO):
        self._f = f
        self.quotes = 0  # odd at the end: a stray quote swallowed the rest of the file into one field

    def read(self, n: int = -1) -> bytes:
        data = self._f.read() if n is None or n < 0 else self._f.read(n)
        self.quotes += data.count(b'"')
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass


def scan_csv(paths: Sequence[str], overrides: dict[str, str] | None = None) -> CsvScan:
    """Arrow types from every row of every file, in one streaming pass per file.

    Done at compile time so every block is parsed with the same types and downstream components
    (tf.Transform) know the schema while the graph is built. A column is int64 when every value is
    an integer, float64 when every value is a number, else string; each widening is noted with the
    value and row that caused it. When `overrides` names every column, only the headers are read.
    """
    names = csv_header(paths[0])
    for path in paths[1:]:
        other = csv_header(path)
        if other != names:
            extra, missing = sorted(set(other) - set(names)), sorted(set(names) - set(other))
            raise InputDataError(
                f"{path}: columns differ from {paths[0]}: expected {names}, got {other}"
                + (f" (extra {extra})" if extra else "")
                + (f" (missing {missing})" if missing else "")
            )
    overrides = overrides or {}
    fixed = {name: _type_from_name(kind, name) for name, kind in overrides.items()}
    columns = {n: _ColumnType(n) for n in names if n not in fixed}
    if columns:  # some type is not given: every row decides it
        for path in paths:
            _scan_file(path, names, columns)
    notes = tuple(note for c in columns.values() for note in c.notes)
    for note in notes:
        log.info("ExampleGen types: %s", note)
    fields = [pa.field(n, fixed[n] if n in fixed else _RANK_TYPES[columns[n].rank]) for n in names]
    return CsvScan(pa.schema(fields), notes, tuple((n, c.rank) for n, c in columns.items()))


def _scan_file(path: str, names: list[str], columns: dict[str, _ColumnType]) -> None:
    strings = {n: pa.string() for n in names}
    with open_data(path) as f:
        stream = _QuoteCounting(f)
        rows = 0
        try:
            reader = pv.open_csv(
                stream,
                read_options=pv.ReadOptions(block_size=SCAN_BLOCK_BYTES),
                convert_options=convert_options(names, strings),
                parse_options=pv.ParseOptions(invalid_row_handler=lambda row: "skip"),
            )
            for batch in reader:
                _observe(columns, batch.schema.names, batch.columns, path, rows)
                rows += batch.num_rows
            streamed = True
        except pa.ArrowInvalid:
            streamed = False
        streamed = streamed and stream.quotes % 2 == 0
    # A stray quote or unparsable text: re-read by line-aligned blocks, as the run will, so the rows
    # the run keeps are the rows the types come from.
    if not streamed:
        schema = pa.schema([pa.field(n, pa.string()) for n in names])
        rows = 0
        for _, start, end in byte_ranges(path, 32 << 20):
            table, _bad = parse_csv_block(path, start, end, schema, "skip")
            _observe(columns, table.column_names, table.columns, path, rows)
            rows += table.num_rows


def _observe(
    columns: dict[str, _ColumnType],
    names: list[str],
    values: list[pa.Array | pa.ChunkedArray],
    path: str,
    rows_before: int,
) -> None:
    for name, col in zip(names, values, strict=True):
        if name in columns and columns[name].rank != _STRING:
            chunks = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            columns[name].observe(chunks, path, rows_before)


def infer_csv_types(paths: Sequence[str], overrides: dict[str, str] | None = None) -> pa.Schema:
    """Arrow types of the CSV columns, from every row (see `scan_csv`)."""
    return scan_csv(paths, overrides).schema


def _type_from_name(name: str, column: str) -> pa.DataType:
    types = {
        "int": pa.int64(),
        "int64": pa.int64(),
        "float": pa.float64(),
        "float64": pa.float64(),
        "float32": pa.float64(),
        "string": pa.string(),
        "bytes": pa.string(),
    }
    if name not in types:
        raise InputDataError(f"column_types[{column!r}] = {name!r}: expected one of {sorted(types)}")
    return types[name]
