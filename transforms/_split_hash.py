"""Deterministic per-row hashes, the same from every input format, and the hash-bucket split assignment."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms._arrow_layout import is_list_type

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
    if is_list_type(arr.type):
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
