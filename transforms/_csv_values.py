"""Converting CSV strings to Arrow types as pyarrow's CSV reader does, and finding the strings that do not convert."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

# Candidate syntax only: a value these reject is confirmed bad by Arrow itself before it is dropped.
_INT_RE = r"^-?(?:[0-9]+|0[xX][0-9a-fA-F]+)$"
_FLOAT_RE = r"(?i)^-?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?|nan|inf|infinity)$"
EXPECTED = {"int64": "an integer", "double": "a number"}  # what an error message says a column holds


def convert_options(names: Sequence[str], types: dict[str, pa.DataType] | None) -> pv.ConvertOptions:
    """The reader's options everywhere: only "" is null, and `types` (default: inferred) per column."""
    return pv.ConvertOptions(
        column_types=types or {},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        include_columns=list(names),
    )


def _trim(values: pa.Array) -> pa.Array:
    return pc.utf8_trim(values, characters=" \t")  # the CSV reader ignores spaces around numbers


def converts(values: pa.Array, target: pa.DataType) -> bool:
    """True when every (non-null) string converts to `target`, with or without its surrounding spaces."""
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


def convert(values: pa.Array, target: pa.DataType) -> pa.Array:
    """Strings → `target` (all known to convert); string targets are returned as they are."""
    if pa.types.is_string(target) or pa.types.is_large_string(target):
        return values
    return pc.cast(_trim(values), target)
