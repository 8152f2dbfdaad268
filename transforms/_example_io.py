"""Readers behind ExampleGen: CSV byte ranges parsed by pyarrow, Parquet row groups, TFRecord batches.

Everything is vectorized: a CSV block is parsed by pyarrow's C++ reader, split assignment hashes
whole columns with numpy. Python only touches individual lines on the error path, to say which
file and line is wrong.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

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
_CONVERSION_RE = re.compile(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to (\w+): invalid value '(.*)'")
SAMPLE_BYTES = 1 << 18
SCAN_BLOCK_BYTES = 8 << 20  # the type scan's streaming block: big enough for any sane row
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BadRecord:
    path: str
    line: int
    reason: str
    text: str

    def render(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}\t{self.text}"


# -- files and ranges -----------------------------------------------------------------------------
def match_files(patterns: Sequence[str]) -> list[str]:
    """Expand globs; a pattern matching nothing is an error that names it, and so is one that cannot be listed."""
    files: list[str] = []
    for pattern in patterns:
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except BeamIOError as e:
            causes = list((e.exception_details or {}).values())
            if not causes or not all(_is_not_found(c) for c in causes):
                detail = "; ".join(f"{type(c).__name__}: {c}" for c in causes) or str(e)
                raise InputDataError(
                    f"input path {pattern!r} cannot be listed ({detail}): check the filesystem's "
                    "credentials and permissions for it"
                ) from e
            found = []
        found = [m for m in found if m.size_in_bytes is not None]
        if not found:
            raise InputDataError(f"input path {pattern!r} matches no file: check the path or glob pattern")
        files.extend(sorted(m.path for m in found))
    return sorted(set(files))


def _is_not_found(exc: BaseException) -> bool:
    return (
        isinstance(exc, FileNotFoundError)
        or getattr(exc, "errno", None) == errno.ENOENT
        or getattr(exc, "code", None) == 404  # object stores' NotFound
    )


def is_compressed(path: str) -> bool:
    """True when the suffix names a compression Beam's FileSystems decode (.gz, .bz2, .zst, .xz, .deflate)."""
    return CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED


def open_data(path: str):
    """A file's data: decompressed when its suffix names a compression."""
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO)


def file_size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def read_range(path: str, start: int, length: int) -> bytes:
    with open_data(path) as f:
        f.seek(start)
        return f.read(length)


def csv_header(path: str) -> list[str]:
    """Column names from the first line; empty files and header-only files are errors."""
    head = read_range(path, 0, SAMPLE_BYTES)
    if not head:
        raise InputDataError(f"{path}: file is empty; expected a CSV header line followed by rows")
    first, _sep, rest = head.partition(b"\n")
    names = pv.read_csv(io.BytesIO(first + b"\n"), read_options=pv.ReadOptions(use_threads=False)).column_names
    if not rest.strip():
        raise InputDataError(f"{path}: has a header line but no data rows")
    return names


def byte_ranges(path: str, block_size: int) -> list[tuple[str, int, int]]:
    """Cut a file into ranges of about `block_size` bytes; each reader moves its ends to line starts.

    A compressed file cannot be entered mid-stream, so it is one range, read whole.
    """
    size = file_size(path)
    if is_compressed(path):
        return [(path, 0, size)]
    return [(path, s, min(s + block_size, size)) for s in range(0, size, block_size)] or [(path, 0, 0)]


def _read_block(path: str, start: int, end: int) -> tuple[bytes, int]:
    """Bytes of the whole lines that begin in [start, end); returns (block, offset of first line)."""
    if is_compressed(path):
        with open_data(path) as f:
            header = f.readline()
            return f.read(), len(header)
    size = file_size(path)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        if start > 0:
            f.seek(start - 1)
            prev = f.read(1)
            if prev != b"\n":  # we are mid-line: that line belongs to the previous range
                skipped = f.readline()
                start += len(skipped)
        else:
            f.seek(0)
            start += len(f.readline())  # the header
        if start >= end or start >= size:
            return b"", start
        data = f.read(end - start)
        if not data.endswith(b"\n") and end < size:
            data += f.readline()
        return data, start


def _line_number(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte `offset` (only computed on the error path)."""
    count = 0
    with open_data(path) as f:
        remaining = offset
        while remaining > 0:
            chunk = f.read(min(1 << 22, remaining))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count + 1


# -- converting strings as the CSV reader does ------------------------------------------------------
# Candidate syntax only: a value these reject is confirmed bad by Arrow itself before it is dropped.
_INT_RE = r"^-?(?:[0-9]+|0[xX][0-9a-fA-F]+)$"
_FLOAT_RE = r"(?i)^-?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?|nan|inf|infinity)$"
_EXPECTED = {"int64": "an integer", "double": "a number"}


def _trim(values: pa.Array) -> pa.Array:
    return pc.utf8_trim(values, characters=" \t")  # the CSV reader ignores spaces around numbers


def _converts(values: pa.Array, target: pa.DataType) -> bool:
    for candidate in (values, None):
        try:
            pc.cast(_trim(values) if candidate is None else candidate, target)
            return True
        except pa.ArrowInvalid:
            continue
    return False


def unconvertible(values: pa.Array, target: pa.DataType) -> np.ndarray:
    """Mask of the (non-null) strings that do not convert to `target`, in a few vectorized calls.

    A regex splits likely-good from likely-bad values; Arrow's cast then decides each group whole,
    bisecting only a group that fails, so the work is linear in the number of values.
    """
    trimmed = _trim(values)
    pattern = _INT_RE if pa.types.is_integer(target) else _FLOAT_RE
    looks_ok = pc.match_substring_regex(trimmed, pattern).fill_null(True).to_numpy(zero_copy_only=False)
    bad = np.zeros(len(values), dtype=bool)
    stack = [np.nonzero(looks_ok)[0], np.nonzero(~looks_ok)[0]]
    while stack:
        part = stack.pop()
        if not len(part):
            continue
        try:
            pc.cast(trimmed.take(pa.array(part)), target)
            continue
        except pa.ArrowInvalid:
            pass
        if len(part) == 1:
            bad[part[0]] = True
        else:
            stack += [part[: len(part) // 2], part[len(part) // 2 :]]
    return bad


def _convert(values: pa.Array, target: pa.DataType) -> pa.Array:
    if pa.types.is_string(target) or pa.types.is_large_string(target):
        return values
    return pc.cast(_trim(values), target)


# -- column types from every row --------------------------------------------------------------------
_NULL, _INT, _FLOAT, _STRING = range(4)
_RANK_TYPES = {_NULL: pa.string(), _INT: pa.int64(), _FLOAT: pa.float64(), _STRING: pa.string()}
_RANK_NAMES = {_INT: "int64", _FLOAT: "float64", _STRING: "string"}


@dataclasses.dataclass(frozen=True)
class CsvScan:
    """What one pass over every byte found: column types, why a column was widened, each file's digest."""

    schema: pa.Schema
    notes: tuple[str, ...]
    digests: dict[str, str]


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
            if _converts(values, target):
                return
            i = int(np.argmax(unconvertible(values, target)))
            wider = _FLOAT if self.rank == _INT and _converts(values.slice(i, 1), pa.float64()) else _STRING
            self.notes.append(
                f"column {self.name!r} read as {_RANK_NAMES[wider]}: {path} data row {rows_before + i + 1} "
                f"holds {values[i].as_py()!r}, not {_EXPECTED[str(target)]} like the rows before it"
            )
            self.rank = wider

    @staticmethod
    def _rank_of(value: pa.Array) -> int:
        if _converts(value, pa.int64()):
            return _INT
        return _FLOAT if _converts(value, pa.float64()) else _STRING


class _Digesting:
    """A read-only stream that hashes what passes through it, so the type scan is also the fingerprint."""

    closed = False

    def __init__(self, f):
        self._f, self._hash = f, hashlib.blake2b(digest_size=16)
        self.quotes = 0  # odd at the end: a stray quote swallowed the rest of the file into one field

    def read(self, n: int = -1) -> bytes:
        data = self._f.read() if n is None or n < 0 else self._f.read(n)
        self._hash.update(data)
        self.quotes += data.count(b'"')
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def hexdigest(self) -> str:
        while self.read(1 << 22):  # whatever the parser did not consume still counts
            pass
        return self._hash.hexdigest()


def file_digest(path: str) -> str:
    """blake2b-128 of a file's data (decompressed), the same digest `scan_csv` records."""
    stream = _Digesting(open_data(path))
    try:
        return stream.hexdigest()
    finally:
        stream._f.close()


def scan_csv(paths: Sequence[str], overrides: dict[str, str] | None = None) -> CsvScan:
    """Arrow types from every row of every file, in one streaming pass that also digests each file.

    Done at compile time so every block is parsed with the same types and downstream components
    (tf.Transform) know the schema while the graph is built. A column is int64 when every value is
    an integer, float64 when every value is a number, else string; each widening is noted with the
    value and row that caused it.
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
    digests = {path: _scan_file(path, names, columns) for path in paths}
    notes = tuple(note for c in columns.values() for note in c.notes)
    for note in notes:
        log.info("ExampleGen types: %s", note)
    fields = [pa.field(n, fixed[n] if n in fixed else _RANK_TYPES[columns[n].rank]) for n in names]
    return CsvScan(pa.schema(fields), notes, digests)


def _scan_file(path: str, names: list[str], columns: dict[str, _ColumnType]) -> str:
    strings = {n: pa.string() for n in names}
    with open_data(path) as f:
        stream = _Digesting(f)
        rows = 0
        try:
            reader = pv.open_csv(
                stream,
                read_options=pv.ReadOptions(block_size=SCAN_BLOCK_BYTES),
                convert_options=_convert_options(names, strings),
                parse_options=pv.ParseOptions(invalid_row_handler=lambda row: "skip"),
            )
            for batch in reader:
                for name, col in zip(batch.schema.names, batch.columns, strict=True):
                    if name in columns and columns[name].rank != _STRING:
                        columns[name].observe(col, path, rows)
                rows += batch.num_rows
            streamed = True
        except pa.ArrowInvalid:
            streamed = False
        digest = stream.hexdigest()
        streamed = streamed and stream.quotes % 2 == 0
    # A stray quote or unparsable text: re-read by line-aligned blocks, as the run will, so the rows
    # the run keeps are the rows the types come from.
    if not streamed:
        schema = pa.schema([pa.field(n, pa.string()) for n in names])
        rows = 0
        for _, start, end in byte_ranges(path, 32 << 20):
            table, _bad = parse_csv_block(path, start, end, schema, "skip")
            for name, col in zip(table.column_names, table.columns, strict=True):
                if name in columns and columns[name].rank != _STRING:
                    columns[name].observe(col.combine_chunks(), path, rows)
            rows += table.num_rows
    return digest


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


def _convert_options(names: Sequence[str], types: dict[str, pa.DataType] | None) -> pv.ConvertOptions:
    return pv.ConvertOptions(
        column_types=types or {},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        include_columns=list(names),
    )


# -- CSV parsing ----------------------------------------------------------------------------------
def _find_unterminated_quote(block: bytes) -> int | None:
    """Index of the line with an unterminated quote, or None; a cheap whole-block check first."""
    if block.count(b'"') % 2 == 0:
        return None
    for i, line in enumerate(block.split(b"\n")):
        if line.count(b'"') % 2:
            return i
    return None


def _row_lines(lines: list[bytes]) -> list[int]:
    """Index of the line each CSV row starts on (Arrow skips empty lines; a quoted newline continues a row)."""
    starts, in_quote = [], False
    for i, line in enumerate(lines):
        if not in_quote and line not in (b"", b"\r"):
            starts.append(i)
        if line.count(b'"') % 2:
            in_quote = not in_quote
    return starts


def _read_csv(block: bytes, names: Sequence[str], types: dict[str, pa.DataType], on_invalid) -> pa.Table:
    return pv.read_csv(
        io.BytesIO(block),
        read_options=pv.ReadOptions(column_names=list(names), use_threads=False),
        convert_options=_convert_options(names, types),
        parse_options=pv.ParseOptions(invalid_row_handler=on_invalid),
    )


def parse_csv_block(
    path: str, start: int, end: int, schema: pa.Schema, on_bad_record: str
) -> tuple[pa.Table, list[BadRecord]]:
    """Parse one byte range to a flat Arrow table with `schema`'s types.

    With on_bad_record="error" the first bad line raises InputDataError naming file, line, column
    and what was expected; with "skip" bad lines are dropped and returned so the caller can
    quarantine and count them. A clean block is parsed once; a block with bad lines once more, as
    strings, whose columns are then converted with masks: never once per bad line.
    """
    block, offset = _read_block(path, start, end)
    if not block.strip():
        return schema.empty_table(), []
    original: list[bytes] | None = None  # the block's lines, split only once something is wrong
    problems: list[tuple[int, str]] = []  # (line index in the block, reason)
    kept: list[int] | None = None  # original line index of each line of `block`, once lines were removed

    bad_quote = _find_unterminated_quote(block)
    if bad_quote is not None:
        original = block.split(b"\n")
        problems.append((bad_quote, 'unterminated quote: a field opens with " but the line ends before it closes'))
        if on_bad_record != "skip":
            return _reject(path, offset, original, problems, on_bad_record)
        kept = [i for i in range(len(original)) if i != bad_quote]
        block = b"\n".join(original[i] for i in kept)

    types = {f.name: f.type for f in schema}
    invalid: list[tuple[int | None, int]] = []

    def on_invalid(row):
        invalid.append((row.number, row.actual_columns))
        return "skip"

    try:
        table = _read_csv(block, schema.names, types, on_invalid)
        if not invalid and not problems:
            return table, []
    except pa.ArrowInvalid as e:
        if not _CONVERSION_RE.search(str(e)):
            raise InputDataError(f"{path} (bytes {start}-{end}): cannot parse CSV: {e}") from None
    # Something is wrong: parse once more as strings and find every bad row in one pass.
    invalid.clear()
    try:
        strings = _read_csv(block, schema.names, {n: pa.string() for n in schema.names}, on_invalid)
    except pa.ArrowInvalid as e:
        raise InputDataError(f"{path} (bytes {start}-{end}): cannot parse CSV: {e}") from None
    if any(number is None for number, _ in invalid):
        raise InputDataError(f"{path} (bytes {start}-{end}): a row has the wrong number of columns")
    lines = block.split(b"\n")
    original = original or lines
    row_lines = _row_lines(lines)

    def line_of(row_number: int) -> int:  # 1-based row number in the block → original line index
        index = row_lines[row_number - 1]
        return kept[index] if kept is not None else index

    for number, actual in invalid:
        problems.append((line_of(number), f"expected {len(schema.names)} columns, got {actual}"))
    valid_numbers = np.setdiff1d(
        np.arange(1, strings.num_rows + len(invalid) + 1), np.array([n for n, _ in invalid], dtype=np.int64)
    )
    drop = np.zeros(strings.num_rows, dtype=bool)
    for name, target in types.items():
        if pa.types.is_string(target):
            continue
        column = strings.column(name).combine_chunks()
        if _converts(column, target):
            continue
        mask = unconvertible(column, target)
        for row in np.nonzero(mask)[0]:
            problems.append(
                (
                    line_of(int(valid_numbers[row])),
                    f"column {name!r}: expected {_EXPECTED[str(target)]} ({target}), got {column[int(row)].as_py()!r}",
                )
            )
        drop |= mask
    if on_bad_record != "skip":
        return _reject(path, offset, original, problems, on_bad_record)
    good = strings.filter(pa.array(~drop)) if drop.any() else strings
    table = pa.table([_convert(good.column(f.name).combine_chunks(), f.type) for f in schema], schema=schema)
    return table, _reject(path, offset, original, problems, on_bad_record)[1]


def _reject(
    path: str, offset: int, lines: list[bytes], problems: list[tuple[int, str]], on_bad_record: str
) -> tuple[pa.Table | None, list[BadRecord]]:
    """Raise for the first problem ("error"), or turn them all into BadRecords ("skip")."""
    first_line = _line_number(path, offset)
    records = sorted(
        (
            BadRecord(path, first_line + index, reason, lines[index].decode(errors="replace").rstrip("\r"))
            for index, reason in problems
        ),
        key=lambda b: b.line,
    )
    if on_bad_record != "skip":
        first = records[0]
        raise InputDataError(f"{first.path}:{first.line}: {first.reason}: {first.text[:200]!r}")
    return None, records


# -- Arrow layout ---------------------------------------------------------------------------------
def to_list_batch(table: pa.Table) -> pa.RecordBatch:
    """Flat columns → large_list columns (missing = null list): the layout TFDV and TFT read."""
    arrays, fields = [], []
    for name, col in zip(table.column_names, table.columns, strict=False):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
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
    return pa.schema([pa.field(f.name, pa.large_list(_value_type(f.type))) for f in flat])


# -- split assignment -----------------------------------------------------------------------------
_NULL_HASH = np.uint64(0x9E3779B97F4A7C15)  # a missing value hashes the same whatever the column type
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * _M1
        h = (h ^ (h >> np.uint64(27))) * _M2
        return h ^ (h >> np.uint64(31))


def _column_hash(arr: pa.Array) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return _list_hash(arr)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type):
        # Numbers hash by value (1 and 1.0 agree, so int/float typing of a column does not move rows);
        # floats at float32 precision, the precision they are stored with, so every format agrees.
        if pa.types.is_floating(arr.type):
            arr = arr.cast(pa.float32())
        filled = arr.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        hashed = _mix(np.ascontiguousarray(filled).view(np.uint64))
        if arr.null_count:
            hashed[~arr.is_valid().to_numpy(zero_copy_only=False)] = _NULL_HASH
        return hashed
    # Strings and bytes: hash the distinct values once (as bytes, so every format agrees), then gather.
    encoded = pc.dictionary_encode(arr.cast(pa.large_binary()))
    dictionary = encoded.dictionary.to_pylist()
    table = np.array(
        [int.from_bytes(hashlib.blake2b(v, digest_size=8).digest(), "little") for v in dictionary] + [int(_NULL_HASH)],
        dtype=np.uint64,
    )
    idx = encoded.indices.fill_null(len(dictionary)).to_numpy(zero_copy_only=False)
    return table[idx]


def _list_hash(arr: pa.Array) -> np.ndarray:
    """Lists of at most one value (the usual case) hash like the flat value; longer lists combine hashes."""
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    values = _column_hash(arr.flatten())
    out = np.full(len(arr), _NULL_HASH, dtype=np.uint64)
    if len(values) == 0:
        return out
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    single = lengths == 1
    out[single] = values[starts[single]]
    for row in np.nonzero(lengths > 1)[0]:
        h = np.uint64(0)
        for v in values[starts[row] : starts[row] + lengths[row]]:
            h = _mix(np.array([h * np.uint64(31) + v], dtype=np.uint64))[0]
        out[row] = h
    return out


def row_hashes(table: pa.Table, columns: Sequence[str] | None = None) -> np.ndarray:
    """A deterministic 64-bit hash per row of the named (default: all) columns.

    Columns are taken by name and missing values contribute nothing, so a row hashes the same
    whether it comes from CSV, Parquet or TFRecord (where an all-missing feature has no column).
    """
    h = np.zeros(table.num_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in sorted(columns or table.column_names):
            col = _column_hash(table.column(name))
            h = np.where(col == _NULL_HASH, h, _mix(h * np.uint64(31) + col))
    return h


def assign_splits(hashes: np.ndarray, ratios: dict[str, int]) -> dict[str, np.ndarray]:
    """Row indices per split from hash buckets; the same row always gets the same split."""
    total = sum(ratios.values())
    buckets = hashes % np.uint64(total)
    out, low = {}, 0
    for name, weight in ratios.items():
        out[name] = np.nonzero((buckets >= low) & (buckets < low + weight))[0]
        low += weight
    return out


# -- Parquet and TFRecord -------------------------------------------------------------------------
def parquet_schema(path: str) -> pa.Schema:
    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).schema_arrow


def parquet_row_groups(path: str) -> Iterator[tuple[str, int, int]]:
    with FileSystems.open(path) as f:
        n = pq.ParquetFile(f).num_row_groups
    for i in range(n):
        yield (path, i, i + 1)


def read_parquet_group(path: str, group: int) -> pa.Table:
    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).read_row_group(group)
