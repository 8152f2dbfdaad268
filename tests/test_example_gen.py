"""ExampleGen: formats, deterministic splits, and every kind of bad input."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from beam_pipeline import artifact_io, fingerprints
from beam_pipeline.errors import InputDataError, PipelineDefinitionError
from tests.helpers import executions_by_state, run_components, store_at
from transforms._arrow_layout import to_list_batch
from transforms._csv_blocks import byte_ranges, parse_csv_block
from transforms._csv_scan import infer_csv_types, scan_csv
from transforms._input_files import csv_header, match_files
from transforms._split_hash import assign_splits, row_hashes
from transforms.example_gen import ExampleGen
from transforms.statistics_gen import StatisticsGen


@pytest.fixture(autouse=True)
def _private_memo(tmp_path, monkeypatch):
    """Fingerprints and types are remembered in the test's own directory, not the user's cache."""
    monkeypatch.setenv(fingerprints.CACHE_DIR_ENV, str(tmp_path / "memo"))


HEADER = "a,b,c\n"


def _write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _rows(n: int, start: int = 0) -> str:
    return "".join(f"{i},{i * 0.5},s{i % 7}\n" for i in range(start, start + n))


def _flat(path):
    return infer_csv_types([path])


# -- parsing, no pipeline -------------------------------------------------------------------------
def test_types_are_inferred_from_start_middle_and_end(tmp_path):
    # Integers at the start, a float only near the end: the column must become a float.
    text = HEADER + _rows(20000) + "5,7,x\n" + "1.5,2,y\n"
    path = _write(tmp_path / "d.csv", text)
    schema = _flat(path)
    assert schema.field("a").type == pa.float64()
    assert schema.field("c").type == pa.string()


def test_column_types_override(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(10))
    schema = infer_csv_types([path], {"a": "string"})
    assert schema.field("a").type == pa.string()
    with pytest.raises(InputDataError, match=r"column_types\['a'\] = 'decimal'"):
        infer_csv_types([path], {"a": "decimal"})


def test_byte_ranges_cover_every_row_exactly_once(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(5000))
    schema = _flat(path)
    total = []
    for _, start, end in byte_ranges(path, 997):
        table, bad = parse_csv_block(path, start, end, schema, "error")
        assert not bad
        total.extend(table.column("a").to_pylist())
    assert total == list(range(5000))


def test_list_layout_keeps_missing_values_as_null_lists():
    table = pa.table({"x": pa.array([1.0, None, 3.0]), "s": pa.array(["a", None, "c"])})
    batch = to_list_batch(table)
    assert batch.schema.field("x").type == pa.large_list(pa.float32())
    assert batch.schema.field("s").type == pa.large_list(pa.large_binary())
    assert batch.column(0).to_pylist() == [[1.0], None, [3.0]]
    assert batch.column(1).to_pylist() == [[b"a"], None, [b"c"]]


def test_split_assignment_is_a_function_of_the_row(tmp_path):
    table = pv.read_csv(pa.BufferReader((HEADER + _rows(3000)).encode()))
    splits = assign_splits(row_hashes(table), {"train": 2, "eval": 1})
    by_row = {}
    for name, rows in splits.items():
        for r in rows:
            by_row[r] = name
    # The same rows in another order and another block get the same splits.
    shuffled = table.take(pa.array(list(range(2999, -1, -1))))
    again = assign_splits(row_hashes(shuffled), {"train": 2, "eval": 1})
    for name, rows in again.items():
        for r in rows:
            assert by_row[2999 - r] == name
    assert 0.6 < len(splits["train"]) / 3000 < 0.73


# -- bad input, each naming file, line and expectation ---------------------------------------------
def _parse_all(path, on_bad="error", block=1 << 20):
    schema = _flat(path) if on_bad == "error" else infer_csv_types([path])
    tables, bad = [], []
    for _, s, e in byte_ranges(path, block):
        t, b = parse_csv_block(path, s, e, schema, on_bad)
        tables.append(t)
        bad.extend(b)
    return tables, bad


def test_missing_input_path(tmp_path):
    with pytest.raises(InputDataError, match=r"input path '.*nope\*\.csv' matches no file"):
        match_files([str(tmp_path / "nope*.csv")])


def test_empty_file_and_header_only(tmp_path):
    empty = _write(tmp_path / "empty.csv", "")
    with pytest.raises(InputDataError, match=r"empty\.csv: file is empty; expected a CSV header"):
        csv_header(empty)
    header_only = _write(tmp_path / "h.csv", HEADER)
    with pytest.raises(InputDataError, match=r"h\.csv: has a header line but no data rows"):
        csv_header(header_only)


def test_wrong_number_of_columns_names_file_and_line(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(3000) + "1,2\n" + _rows(10))
    with pytest.raises(InputDataError, match=r"d\.csv:3002: expected 3 columns, got 2: '1,2'"):
        _parse_all(path, block=4096)  # the bad line sits in a later byte range


def test_unterminated_quote_names_file_and_line(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(5) + '7,1.0,"open\n' + _rows(5))
    with pytest.raises(InputDataError, match=r"d\.csv:7: unterminated quote"):
        _parse_all(path)


def test_non_numeric_value_names_column_and_expected_type(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(50) + "oops,1.0,x\n")
    # Types come from samples; force `a` numeric as it would be in a large file.
    schema = infer_csv_types([path], {"a": "int"})
    with pytest.raises(InputDataError, match=r"d\.csv:52: column 'a': expected an integer \(int64\), got 'oops'"):
        parse_csv_block(path, 0, os.path.getsize(path), schema, "error")


def test_file_whose_columns_differ(tmp_path):
    a = _write(tmp_path / "a.csv", HEADER + _rows(3))
    b = _write(tmp_path / "b.csv", "a,b,d\n" + _rows(3))
    with pytest.raises(InputDataError, match=r"b\.csv: columns differ from .*a\.csv.*extra \['d'\].*missing \['c'\]"):
        infer_csv_types([a, b])


def test_skip_mode_drops_counts_and_reports_bad_lines(tmp_path):
    text = HEADER + _rows(10) + "1,2\n" + '3,4.0,"x\n' + _rows(10, 10) + "nan?,1,z\n"
    path = _write(tmp_path / "d.csv", text)
    schema = infer_csv_types([path], {"a": "int"})
    table, bad = parse_csv_block(path, 0, os.path.getsize(path), schema, "skip")
    assert table.column("a").to_pylist() == list(range(20))
    assert [(b.line, b.reason.split(":")[0]) for b in bad] == [
        (12, "expected 3 columns, got 2"),
        (13, "unterminated quote"),
        (24, "column 'a'"),
    ]


# -- through the pipeline --------------------------------------------------------------------------
def test_bad_record_fails_the_run_and_publishes_nothing(tmp_path):
    data = _write(tmp_path / "d.csv", HEADER + _rows(100) + "1,2\n")
    gen = ExampleGen(input_base=data)
    stats = StatisticsGen(examples=gen.outputs.examples)
    with pytest.raises(InputDataError, match=r"d\.csv:102: expected 3 columns, got 2"):
        run_components(tmp_path / "root", [gen, stats])
    store = store_at(tmp_path / "root")
    assert executions_by_state(store) == {"FAILED": ["ExampleGen", "StatisticsGen"]}
    assert store.mlmd.get_artifacts() == []
    assert not os.path.exists(tmp_path / "root" / "ExampleGen" / "examples" / "1")


def test_skip_mode_quarantines_and_reports(tmp_path):
    data = _write(tmp_path / "d.csv", HEADER + _rows(100) + "1,2\n" + _rows(5, 100))
    gen = ExampleGen(input_base=data, on_bad_record="skip")
    result = run_components(tmp_path / "root", [gen])
    examples = result.artifact("ExampleGen", "examples")
    assert examples.properties["bad_records"] == 1
    assert sum(examples.properties["row_counts"].values()) == 105
    quarantined = open(os.path.join(examples.uri, "Quarantine", "part-00000.txt")).read()
    assert "d.csv:102: expected 3 columns, got 2\t1,2" in quarantined


def test_missing_input_fails_before_anything_runs(tmp_path):
    gen = ExampleGen(input_base=str(tmp_path / "absent" / "*.csv"))
    with pytest.raises(InputDataError, match="matches no file"):
        run_components(tmp_path / "root", [gen])
    assert store_at(tmp_path / "root").mlmd.get_executions() == []


def test_glob_of_several_files_and_block_ranges(tmp_path):
    for i in range(3):
        _write(tmp_path / f"part{i}.csv", HEADER + _rows(400, i * 400))
    gen = ExampleGen(input_base=str(tmp_path / "part*.csv"), block_size_bytes=2048)
    result = run_components(tmp_path / "root", [gen])
    examples = result.artifact("ExampleGen", "examples")
    assert sum(examples.properties["row_counts"].values()) == 1200
    batches = artifact_io.read_parquet_batches(os.path.join(examples.uri, "Split-*", "*.parquet"))
    values = sorted(v[0] for b in batches for v in b.column(0).to_pylist())
    assert values == list(range(1200))


def test_parquet_and_tfrecord_inputs_give_the_same_rows(tmp_path, taxi_small_csv):
    import tensorflow as tf

    table = pv.read_csv(taxi_small_csv, convert_options=pv.ConvertOptions(strings_can_be_null=True))
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=400)
    with tf.io.TFRecordWriter(str(tmp_path / "data.tfrecord")) as w:
        for row in table.to_pylist():
            features = {}
            for k, v in row.items():
                if v is None:
                    continue
                if isinstance(v, str):
                    features[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
                elif isinstance(v, float):
                    features[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
                else:
                    features[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
            w.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    gens = [
        ExampleGen(input_base=taxi_small_csv).with_id("csv"),
        ExampleGen(input_base=str(tmp_path / "data.parquet"), format="parquet").with_id("parquet"),
        ExampleGen(input_base=str(tmp_path / "data.tfrecord"), format="tfrecord").with_id("tfrecord"),
    ]
    result = run_components(tmp_path / "root", gens)
    counts = {g.id: result.artifact(g.id, "examples").properties["row_counts"] for g in gens}
    assert sum(counts["csv"].values()) == 1500
    assert counts["csv"] == counts["parquet"], counts
    assert counts["tfrecord"] == counts["csv"], counts


def test_partition_feature_keeps_each_value_in_one_split():
    table = pa.table({"user": pa.array([f"u{i % 40}" for i in range(4000)]), "x": pa.array(range(4000))})
    splits = assign_splits(row_hashes(table, ["user"]), {"train": 3, "eval": 1})
    users = {name: set(table.column("user").take(pa.array(rows)).to_pylist()) for name, rows in splits.items()}
    assert users["train"] and users["eval"] and not users["train"] & users["eval"]
    assert len(users["train"]) + len(users["eval"]) == 40


# -- types from every row, not a sample --------------------------------------------------------------
def test_a_value_outside_any_sample_widens_the_column_and_is_noted(tmp_path):
    # 1.2 MB: a sample of start, middle and end would miss rows 30,000-30,001.
    text = HEADER + _rows(30000) + "7.5,1,x\n" + "8,2,y\n" + _rows(30000, 30000)
    path = _write(tmp_path / "d.csv", text)
    scan = scan_csv([path])
    assert scan.schema.field("a").type == pa.float64()
    assert scan.schema.field("c").type == pa.string()
    [note] = scan.notes
    assert "column 'a' read as float64" in note and "data row 30001" in note and "'7.5'" in note


def test_an_int_column_with_a_word_in_its_last_row_becomes_string(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(50000) + "late,1.0,x\n")
    scan = scan_csv([path])
    assert scan.schema.field("a").type == pa.string()
    assert "column 'a' read as string" in scan.notes[0] and "'late', not an integer" in scan.notes[0]
    tables, bad = _parse_all(path, "skip", block=1 << 16)
    assert not bad and sum(t.num_rows for t in tables) == 50001


def test_inferred_types_agree_with_the_csv_reader_on_edge_values(tmp_path):
    # Whatever the scan calls int or float, the block parser must read without a bad row, and a
    # value the reader rejects must widen the column.
    for values, expected in [
        ([" 1", "2 ", "-3", "0x10"], pa.int64()),
        (["1", "1e3", ".5", "5.", "nan", "-inf", " 2.5"], pa.float64()),
        (["1", "+2"], pa.string()),
        (["1", "1_000"], pa.string()),
        (["1.5", "1e"], pa.string()),
        (["", "3"], pa.int64()),
        (["", '""'], pa.string()),
    ]:
        path = _write(tmp_path / "e.csv", "v,w\n" + "".join(f"{v},x\n" for v in values))
        schema = infer_csv_types([path])
        assert schema.field("v").type == expected, values
        table, bad = parse_csv_block(path, 0, os.path.getsize(path), schema, "error")
        assert not bad and table.num_rows == len(values)


# -- skip mode is linear --------------------------------------------------------------------------------
def _count_parses(monkeypatch) -> list[int]:
    calls = []
    original = pv.read_csv

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pv, "read_csv", counting)
    return calls


def _interleaved(n_good: int, n_bad: int) -> str:
    lines, bad_every = [], max(1, n_good // max(1, n_bad))
    b = 0
    for i in range(n_good):
        lines.append(f"{i},{i * 0.5},s{i % 7}\n")
        if b < n_bad and i % bad_every == 0:
            lines.append(f"bad{b},{b},z\n" if b % 2 else f"{b},oops{b},z\n")
            b += 1
    return HEADER + "".join(lines)


def test_skip_mode_parses_a_block_a_fixed_number_of_times_however_many_rows_are_bad(tmp_path, monkeypatch):
    schema = pa.schema([("a", pa.int64()), ("b", pa.float64()), ("c", pa.string())])
    parses = {}
    for n_bad in (10, 10000):
        path = _write(tmp_path / f"bad{n_bad}.csv", _interleaved(20000, n_bad))
        calls = _count_parses(monkeypatch)
        table, bad = parse_csv_block(path, 0, os.path.getsize(path), schema, "skip")
        parses[n_bad] = len(calls)
        monkeypatch.undo()
        assert len(bad) == n_bad
        assert table.column("a").to_pylist() == list(range(20000))
        assert table.column("b").to_pylist() == [i * 0.5 for i in range(20000)]
        lines = open(path).read().split("\n")
        for record in bad:  # each names the right line, column and what was expected
            assert lines[record.line - 1] == record.text
            column = "a" if record.text.startswith("bad") else "b"
            assert record.reason.startswith(f"column {column!r}: expected "), record
    assert parses == {10: 2, 10000: 2}


def test_ten_thousand_bad_rows_in_one_block_are_quarantined_and_counted(tmp_path):
    data = _write(tmp_path / "d.csv", _interleaved(20000, 10000))
    gen = ExampleGen(input_base=data, on_bad_record="skip", column_types={"a": "int", "b": "float"})
    examples = run_components(tmp_path / "root", [gen]).artifact("ExampleGen", "examples")
    assert examples.properties["bad_records"] == 10000
    assert sum(examples.properties["row_counts"].values()) == 20000
    quarantined = open(os.path.join(examples.uri, "Quarantine", "part-00000.txt")).read().splitlines()
    assert len(quarantined) == 10000
    assert all("d.csv:" in q and ": column '" in q for q in quarantined)


def test_line_numbers_count_empty_lines_and_quoted_newlines(tmp_path):
    text = HEADER + '1,1.0,x\n\n2,2.0,"two\nlines"\n3\n4,4.0,y\nfive,5.0,z\n6,6.0,w\n'
    path = _write(tmp_path / "d.csv", text)
    schema = pa.schema([("a", pa.int64()), ("b", pa.float64()), ("c", pa.string())])
    with pytest.raises(InputDataError, match=r"d\.csv:6: expected 3 columns, got 1: '3'"):
        parse_csv_block(path, 0, os.path.getsize(path), schema, "error")
    table, bad = parse_csv_block(path, 0, os.path.getsize(path), schema, "skip")
    assert table.column("a").to_pylist() == [1, 2, 4, 6]
    assert table.column("c").to_pylist() == ["x", "two\nlines", "y", "w"]
    assert [(b.line, b.reason) for b in bad] == [
        (6, "expected 3 columns, got 1"),
        (8, "column 'a': expected an integer (int64), got 'five'"),
    ]


# -- compressed input ---------------------------------------------------------------------------------
def _examples_rows(examples) -> dict[str, list]:
    out = {}
    for split in examples.properties["split_names"]:
        batches = artifact_io.read_parquet_batches(os.path.join(examples.uri, f"Split-{split}", "*.parquet"))
        table = pa.Table.from_batches(batches)
        out[split] = sorted(map(repr, table.to_pylist()))
    return out


def test_compressed_csv_gives_the_same_examples_as_the_plain_file(tmp_path, taxi_small_csv):
    import bz2
    import gzip

    raw = open(taxi_small_csv, "rb").read()
    with gzip.open(tmp_path / "data.csv.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "data.csv.bz2").write_bytes(bz2.compress(raw))
    assert byte_ranges(str(tmp_path / "data.csv.gz"), 4096) == [
        (str(tmp_path / "data.csv.gz"), 0, os.path.getsize(tmp_path / "data.csv.gz"))
    ]
    gens = [
        ExampleGen(input_base=taxi_small_csv, block_size_bytes=64 << 10).with_id("plain"),
        ExampleGen(input_base=str(tmp_path / "data.csv.gz"), block_size_bytes=64 << 10).with_id("gz"),
        ExampleGen(input_base=str(tmp_path / "data.csv.bz2")).with_id("bz2"),
    ]
    result = run_components(tmp_path / "root", gens)
    plain, gz, bz = (result.artifact(g, "examples") for g in ("plain", "gz", "bz2"))
    assert sum(plain.properties["row_counts"].values()) == 1500
    assert gz.properties["row_counts"] == plain.properties["row_counts"] == bz.properties["row_counts"]
    assert _examples_rows(gz) == _examples_rows(plain) == _examples_rows(bz)


def test_a_compressed_file_has_one_fingerprint_with_or_without_the_scan(tmp_path):
    """The fingerprint is of the stored bytes, whichever runs first: the type scan or the fingerprint."""
    import gzip

    with gzip.open(tmp_path / "d.csv.gz", "wt") as f:
        f.write(HEADER + _rows(100))
    scanned = ExampleGen(input_base=str(tmp_path / "d.csv.gz"))
    scanned.static_outputs({})
    unscanned = ExampleGen(input_base=str(tmp_path / "d.csv.gz"))
    assert scanned.external_fingerprint() == unscanned.external_fingerprint()


def test_a_bad_line_in_a_compressed_file_is_named_by_its_line(tmp_path):
    import gzip

    with gzip.open(tmp_path / "d.csv.gz", "wt") as f:
        f.write(HEADER + _rows(100) + "1,2\n")
    with pytest.raises(InputDataError, match=r"d\.csv\.gz:102: expected 3 columns, got 2"):
        _parse_all(str(tmp_path / "d.csv.gz"))


# -- listing errors are not "no such file" ----------------------------------------------------------------
def test_a_filesystem_error_while_listing_names_the_pattern_and_is_not_no_match(tmp_path, monkeypatch):
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    pattern = "gs://bucket/data/*.csv"

    def denied(patterns, limits=None):
        raise BeamIOError("Match operation failed", {patterns[0]: PermissionError(13, "403 Forbidden: caller lacks")})

    monkeypatch.setattr(FileSystems, "match", staticmethod(denied))
    with pytest.raises(
        InputDataError, match=r"input path 'gs://bucket/data/\*\.csv' cannot be listed \(PermissionError"
    ):
        match_files([pattern])

    def missing(patterns, limits=None):
        raise BeamIOError("Match operation failed", {patterns[0]: FileNotFoundError(2, "No such file")})

    monkeypatch.setattr(FileSystems, "match", staticmethod(missing))
    with pytest.raises(InputDataError, match=r"input path 'gs://bucket/data/\*\.csv' matches no file"):
        match_files([pattern])


# -- nothing memoized across runs ------------------------------------------------------------------------
def test_running_the_same_pipeline_object_again_sees_a_new_input_file(tmp_path):
    from beam_pipeline import Pipeline, launcher

    _write(tmp_path / "part0.csv", HEADER + _rows(300))
    pipeline = Pipeline("again", str(tmp_path / "root"), [ExampleGen(input_base=str(tmp_path / "part*.csv"))])
    first = launcher.run(pipeline).artifact("ExampleGen", "examples")
    assert sum(first.properties["row_counts"].values()) == 300
    _write(tmp_path / "part1.csv", HEADER + _rows(200, 300))
    second = launcher.run(pipeline).artifact("ExampleGen", "examples")
    assert second.id != first.id
    assert sum(second.properties["row_counts"].values()) == 500
    batches = artifact_io.read_parquet_batches(os.path.join(second.uri, "Split-*", "*.parquet"))
    assert sorted(v[0] for b in batches for v in b.column("a").to_pylist()) == list(range(500))


def test_a_stray_quote_does_not_stop_the_type_scan(tmp_path):
    # Arrow's streaming reader folds everything after the quote into one field; the float after it counts.
    path = _write(tmp_path / "d.csv", HEADER + _rows(200) + '7,1.0,"open\n' + _rows(200, 200) + "9.5,1,z\n")
    assert infer_csv_types([path]).types == [pa.float64(), pa.float64(), pa.string()]
    tables, bad = _parse_all(path, "skip")
    assert [b.line for b in bad] == [202]
    assert sum(t.num_rows for t in tables) == 401


def test_the_remembered_types_are_the_files_own_and_follow_a_change(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(100))
    gen = ExampleGen(input_base=path)
    fresh = gen.external_fingerprint()
    assert gen.static_outputs({})["examples"]["flat_schema"].field("a").type == pa.int64()
    assert gen.external_fingerprint() == fresh
    # Same size, new content: the fingerprint and the types follow it, not what was remembered.
    _write(tmp_path / "d.csv", HEADER + _rows(99) + "9.5,9.5,s1\n")
    assert os.path.getsize(path) == len(HEADER + _rows(100))
    assert gen.external_fingerprint() != fresh
    static = gen.static_outputs({})["examples"]
    assert static["flat_schema"].field("a").type == pa.float64()
    assert "column 'a' read as float64" in static["column_type_notes"][0]


def test_read_examples_alone_gives_what_example_gen_commits(tmp_path, taxi_small_csv):
    from apache_beam.testing.util import assert_that

    from tests.helpers import in_process_pipeline
    from transforms.example_gen import ReadExamples

    committed = run_components(tmp_path / "root", [ExampleGen(input_base=taxi_small_csv)]).artifact(
        "ExampleGen", "examples"
    )
    read = ReadExamples(taxi_small_csv)
    p = in_process_pipeline()
    examples = p | read
    for split in ("train", "eval"):
        expected = pa.Table.from_batches(
            artifact_io.read_parquet_batches(os.path.join(committed.split_uri(split), "*.parquet"))
        )

        def same_rows(batches, expected=expected):
            got = pa.Table.from_batches(batches, schema=read.arrow_schema)
            assert got.num_rows == expected.num_rows > 0
            assert sorted(map(str, got.to_pylist())) == sorted(map(str, expected.to_pylist()))

        assert_that(examples[split], same_rows, label=f"Same[{split}]")
    p.run().wait_until_finish()


def test_read_examples_validates_when_built(tmp_path):
    from transforms.example_gen import ReadExamples

    with pytest.raises(PipelineDefinitionError, match="format 'xml': expected one of"):
        ReadExamples(str(tmp_path / "*.csv"), format="xml")
