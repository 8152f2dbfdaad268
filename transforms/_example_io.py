"""Readers behind ExampleGen: CSV byte ranges parsed by pyarrow, Parquet row groups, TFRecord batches.

Everything is vectorized: a CSV block is parsed by pyarrow's C++ reader, split assignment hashes
whole columns with numpy. Python only touches individual lines on the error path, to say which
file and line is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
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
    """Expand globs; a pattern matching nothing is an error that names it."""
    files: list[str] = []
    for pattern in patterns:
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # Beam raises for a non-existent directory
            found = []
        found = [m for m in found if m.size_in_bytes is not None]
        if not found:
            raise InputDataError(f"input path {pattern!r} matches no file: check the path or glob pattern")
        files.extend(sorted(m.path for m in found))
    return sorted(set(files))


def file_size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def read_range(path: str, start: int, length: int) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        f.seek(start)
        return f.read(length)


def csv_header(path: str) -> list[str]:
    """Column names from the first line; empty files and header-only files are errors."""
    if file_size(path) == 0:
        raise InputDataError(f"{path}: file is empty; expected a CSV header line followed by rows")
    head = read_range(path, 0, SAMPLE_BYTES)
    first, _sep, rest = head.partition(b"\n")
    names = pv.read_csv(io.BytesIO(first + b"\n"), read_options=pv.ReadOptions(use_threads=False)).column_names
    if not rest.strip():
        raise InputDataError(f"{path}: has a header line but no data rows")
    return names


def byte_ranges(path: str, block_size: int) -> list[tuple[str, int, int]]:
    """Cut a file into ranges of about `block_size` bytes; each reader moves its ends to line starts."""
    size = file_size(path)
    return [(path, s, min(s + block_size, size)) for s in range(0, size, block_size)] or [(path, 0, 0)]


def _read_block(path: str, start: int, end: int) -> tuple[bytes, int]:
    """Bytes of the whole lines that begin in [start, end); returns (block, offset of first line)."""
    size = file_size(path)
    with FileSystems.open(path, compression_type="uncompressed") as f:
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
    with FileSystems.open(path, compression_type="uncompressed") as f:
        remaining = offset
        while remaining > 0:
            chunk = f.read(min(1 << 22, remaining))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count + 1


# -- CSV parsing ----------------------------------------------------------------------------------
def infer_csv_types(paths: Sequence[str], overrides: dict[str, str] | None = None) -> pa.Schema:
    """Arrow types from samples at the start, middle and end of each file (merged: int+float → float).

    Done at compile time so every block is parsed with the same types and downstream components
    (tf.Transform) know the schema while the graph is built.
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
    seen: dict[str, set[pa.DataType]] = {n: set() for n in names}
    for path in paths[:8]:
        size = file_size(path)
        for start in sorted({0, size // 2, max(0, size - SAMPLE_BYTES)}):
            block, _ = _read_block(path, start, min(size, start + SAMPLE_BYTES))
            if not block:
                continue
            try:
                table = pv.read_csv(
                    io.BytesIO(block),
                    read_options=pv.ReadOptions(column_names=names, use_threads=False),
                    convert_options=_convert_options(names, None),
                    parse_options=pv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                )
            except pa.ArrowInvalid:
                continue  # a bad line in the sample: the real parse will report it precisely
            for name, col in zip(names, table.columns, strict=False):
                seen[name].add(col.type)
    overrides = overrides or {}
    fields = []
    for name in names:
        if name in overrides:
            fields.append(pa.field(name, _type_from_name(overrides[name], name)))
        else:
            fields.append(pa.field(name, _merge_types(seen[name])))
    return pa.schema(fields)


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


def _merge_types(types: set[pa.DataType]) -> pa.DataType:
    types = {t for t in types if t != pa.null()}
    if not types:
        return pa.string()
    if types <= {pa.int64(), pa.bool_()} and pa.bool_() not in types:
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return pa.float64()
    return pa.string()


def _convert_options(names: Sequence[str], types: dict[str, pa.DataType] | None) -> pv.ConvertOptions:
    return pv.ConvertOptions(
        column_types=types or {},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        include_columns=list(names),
    )


def _find_unterminated_quote(block: bytes) -> int | None:
    """Index of the line with an unterminated quote, or None; a cheap whole-block check first."""
    if block.count(b'"') % 2 == 0:
        return None
    for i, line in enumerate(block.split(b"\n")):
        if line.count(b'"') % 2:
            return i
    return None


def parse_csv_block(
    path: str, start: int, end: int, schema: pa.Schema, on_bad_record: str
) -> tuple[pa.Table, list[BadRecord]]:
    """Parse one byte range to a flat Arrow table with `schema`'s types.

    With on_bad_record="error" the first bad line raises InputDataError naming file and line; with
    "skip" bad lines are dropped and returned so the caller can quarantine and count them.
    """
    block, offset = _read_block(path, start, end)
    names = schema.names
    if not block.strip():
        return schema.empty_table(), []
    bad: list[BadRecord] = []
    lines: list[bytes] | None = None  # split lazily, only once something is wrong
    dropped: list[int] = []  # 0-based indices (in the original block) of removed lines
    first_line: int | None = None

    def physical(index: int) -> int:
        nonlocal first_line
        if first_line is None:
            first_line = _line_number(path, offset)
        return first_line + index

    def reject(index: int, reason: str) -> None:
        nonlocal lines, block
        text = lines[index].decode(errors="replace")
        if on_bad_record != "skip":
            raise InputDataError(f"{path}:{physical(index)}: {reason}: {text[:200]!r}")
        bad.append(BadRecord(path, physical(index), reason, text))
        dropped.append(index)
        gone = set(dropped)
        block = b"\n".join(ln for i, ln in enumerate(lines) if i not in gone)

    def original_index(kept_index: int) -> int:
        """Map an index among the remaining lines back to its index in the original block."""
        removed = sorted(dropped)
        idx = kept_index
        for r in removed:
            if r <= idx:
                idx += 1
        return idx

    bad_quote = _find_unterminated_quote(block)
    if bad_quote is not None:
        lines = block.split(b"\n")
        reject(bad_quote, 'unterminated quote: a field opens with " but the line ends before it closes')
    types = {f.name: f.type for f in schema}
    for _ in range(100000):
        invalid: list[tuple[int, int, int]] = []

        def on_invalid(row, invalid=invalid):
            invalid.append((row.number, row.expected_columns, row.actual_columns))
            return "skip"

        try:
            table = pv.read_csv(
                io.BytesIO(block),
                read_options=pv.ReadOptions(column_names=names, use_threads=False),
                convert_options=_convert_options(names, types),
                parse_options=pv.ParseOptions(invalid_row_handler=on_invalid),
            )
        except pa.ArrowInvalid as e:
            m = _CONVERSION_RE.search(str(e))
            if not m:
                raise InputDataError(f"{path} (bytes {start}-{end}): cannot parse CSV: {e}") from None
            col, row, target, value = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            lines = lines or block.split(b"\n")
            expected = "an integer" if "int" in target else "a number"
            reject(
                original_index(row - 1),
                f"column {names[col]!r}: expected {expected} ({types[names[col]]}), got {value!r}",
            )
            continue
        if invalid:
            lines = lines or block.split(b"\n")
            if any(number is None for number, _, _ in invalid):
                raise InputDataError(f"{path}: a row has {invalid[0][2]} columns, expected {invalid[0][1]}")
            located = [(original_index(number - 1), expected, actual) for number, expected, actual in invalid]
            for index, expected, actual in located:
                reject(index, f"expected {expected} columns, got {actual}")
            continue  # reparse without those lines so row numbers in later errors stay exact
        return table, sorted(bad, key=lambda b: b.line)
    raise InputDataError(f"{path}: too many bad records in bytes {start}-{end}")


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
