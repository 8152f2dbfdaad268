"""CSV at run time: cutting files into byte ranges and parsing one range, raising on or setting aside its bad lines."""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.errors import InputDataError
from transforms._csv_values import EXPECTED, convert, convert_options, converts, unconvertible
from transforms._input_files import file_size, is_compressed, open_data

_CONVERSION_RE = re.compile(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to (\w+): invalid value '(.*)'")


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A CSV line left out of the data: where it is, why, and its text."""

    path: str
    line: int
    reason: str
    text: str

    def render(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}\t{self.text}"


# -- byte ranges ----------------------------------------------------------------------------------
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


# -- parsing one range ----------------------------------------------------------------------------
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


def _read_csv(block: bytes, names: Sequence[str], types: dict[str, pa.DataType], on_invalid: Callable) -> pa.Table:
    return pv.read_csv(
        io.BytesIO(block),
        read_options=pv.ReadOptions(column_names=list(names), use_threads=False),
        convert_options=convert_options(names, types),
        parse_options=pv.ParseOptions(invalid_row_handler=on_invalid),
    )


def _unparsable(path: str, start: int, end: int, e: pa.ArrowInvalid) -> InputDataError:
    return InputDataError(f"{path} (bytes {start}-{end}): cannot parse CSV: {e}")


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
            raise _unparsable(path, start, end, e) from None
    # Something is wrong: parse once more as strings and find every bad row in one pass.
    invalid.clear()
    try:
        strings = _read_csv(block, schema.names, {n: pa.string() for n in schema.names}, on_invalid)
    except pa.ArrowInvalid as e:
        raise _unparsable(path, start, end, e) from None
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
        if converts(column, target):
            continue
        mask = unconvertible(column, target)
        for row in np.nonzero(mask)[0]:
            problems.append(
                (
                    line_of(int(valid_numbers[row])),
                    f"column {name!r}: expected {EXPECTED[str(target)]} ({target}), got {column[int(row)].as_py()!r}",
                )
            )
        drop |= mask
    if on_bad_record != "skip":
        return _reject(path, offset, original, problems, on_bad_record)
    good = strings.filter(pa.array(~drop)) if drop.any() else strings
    table = pa.table([convert(good.column(f.name).combine_chunks(), f.type) for f in schema], schema=schema)
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
