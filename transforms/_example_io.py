"""ExampleGen's reader API in one namespace, for importers such as Evaluator; each name lives in its own module.

Where each job lives: `_input_files` (listing, opening, headers), `_csv_values` (string conversion),
`_csv_scan` (compile-time types), `_csv_blocks` (byte ranges and run-time parsing),
`_parquet_tfrecord`, `_arrow_layout` (large_list layout) and `_split_hash` (row hashes, splits).
"""

from transforms._arrow_layout import NUMERIC_TO_LIST, list_schema, to_list_batch
from transforms._csv_blocks import BadRecord, byte_ranges, parse_csv_block
from transforms._csv_scan import SCAN_BLOCK_BYTES, CsvScan, infer_csv_types, scan_csv
from transforms._csv_values import unconvertible
from transforms._input_files import (
    SAMPLE_BYTES,
    csv_header,
    file_size,
    is_compressed,
    match_files,
    match_metadata,
    open_data,
    read_range,
)
from transforms._parquet_tfrecord import parquet_row_groups, parquet_schema, read_parquet_group
from transforms._split_hash import assign_splits, row_hashes

__all__ = [
    "NUMERIC_TO_LIST",
    "SAMPLE_BYTES",
    "SCAN_BLOCK_BYTES",
    "BadRecord",
    "CsvScan",
    "assign_splits",
    "byte_ranges",
    "csv_header",
    "file_size",
    "infer_csv_types",
    "is_compressed",
    "list_schema",
    "match_files",
    "match_metadata",
    "open_data",
    "parquet_row_groups",
    "parquet_schema",
    "parse_csv_block",
    "read_parquet_group",
    "read_range",
    "row_hashes",
    "scan_csv",
    "to_list_batch",
    "unconvertible",
]
