"""ExampleGen: formats, deterministic splits, and every kind of bad input."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from beam_pipeline import artifact_io
from beam_pipeline.errors import InputDataError
from tests.helpers import executions_by_state, run_components, store_at
from transforms import _example_io as io_
from transforms.example_gen import ExampleGen
from transforms.statistics_gen import StatisticsGen

HEADER = "a,b,c\n"


def _write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _rows(n: int, start: int = 0) -> str:
    return "".join(f"{i},{i * 0.5},s{i % 7}\n" for i in range(start, start + n))


def _flat(path):
    return io_.infer_csv_types([path])


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
    schema = io_.infer_csv_types([path], {"a": "string"})
    assert schema.field("a").type == pa.string()
    with pytest.raises(InputDataError, match=r"column_types\['a'\] = 'decimal'"):
        io_.infer_csv_types([path], {"a": "decimal"})


def test_byte_ranges_cover_every_row_exactly_once(tmp_path):
    path = _write(tmp_path / "d.csv", HEADER + _rows(5000))
    schema = _flat(path)
    total = []
    for _, start, end in io_.byte_ranges(path, 997):
        table, bad = io_.parse_csv_block(path, start, end, schema, "error")
        assert not bad
        total.extend(table.column("a").to_pylist())
    assert total == list(range(5000))


def test_list_layout_keeps_missing_values_as_null_lists():
    table = pa.table({"x": pa.array([1.0, None, 3.0]), "s": pa.array(["a", None, "c"])})
    batch = io_.to_list_batch(table)
    assert batch.schema.field("x").type == pa.large_list(pa.float32())
    assert batch.schema.field("s").type == pa.large_list(pa.large_binary())
    assert batch.column(0).to_pylist() == [[1.0], None, [3.0]]
    assert batch.column(1).to_pylist() == [[b"a"], None, [b"c"]]


def test_split_assignment_is_a_function_of_the_row(tmp_path):
    table = pv.read_csv(pa.BufferReader((HEADER + _rows(3000)).encode()))
    splits = io_.assign_splits(io_.row_hashes(table), {"train": 2, "eval": 1})
    by_row = {}
    for name, rows in splits.items():
        for r in rows:
            by_row[r] = name
    # The same rows in another order and another block get the same splits.
    shuffled = table.take(pa.array(list(range(2999, -1, -1))))
    again = io_.assign_splits(io_.row_hashes(shuffled), {"train": 2, "eval": 1})
    for name, rows in again.items():
        for r in rows:
            assert by_row[2999 - r] == name
    assert 0.6 < len(splits["train"]) / 3000 < 0.73


# -- bad input, each naming file, line and expectation ---------------------------------------------
def _parse_all(path, on_bad="error", block=1 << 20):
    schema = _flat(path) if on_bad == "error" else io_.infer_csv_types([path])
    tables, bad = [], []
    for _, s, e in io_.byte_ranges(path, block):
        t, b = io_.parse_csv_block(path, s, e, schema, on_bad)
        tables.append(t)
        bad.extend(b)
    return tables, bad


def test_missing_input_path(tmp_path):
    with pytest.raises(InputDataError, match=r"input path '.*nope\*\.csv' matches no file"):
        io_.match_files([str(tmp_path / "nope*.csv")])


def test_empty_file_and_header_only(tmp_path):
    empty = _write(tmp_path / "empty.csv", "")
    with pytest.raises(InputDataError, match=r"empty\.csv: file is empty; expected a CSV header"):
        io_.csv_header(empty)
    header_only = _write(tmp_path / "h.csv", HEADER)
    with pytest.raises(InputDataError, match=r"h\.csv: has a header line but no data rows"):
        io_.csv_header(header_only)


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
    schema = io_.infer_csv_types([path], {"a": "int"})
    with pytest.raises(InputDataError, match=r"d\.csv:52: column 'a': expected an integer \(int64\), got 'oops'"):
        io_.parse_csv_block(path, 0, os.path.getsize(path), schema, "error")


def test_file_whose_columns_differ(tmp_path):
    a = _write(tmp_path / "a.csv", HEADER + _rows(3))
    b = _write(tmp_path / "b.csv", "a,b,d\n" + _rows(3))
    with pytest.raises(InputDataError, match=r"b\.csv: columns differ from .*a\.csv.*extra \['d'\].*missing \['c'\]"):
        io_.infer_csv_types([a, b])


def test_skip_mode_drops_counts_and_reports_bad_lines(tmp_path):
    text = HEADER + _rows(10) + "1,2\n" + '3,4.0,"x\n' + _rows(10, 10) + "nan?,1,z\n"
    path = _write(tmp_path / "d.csv", text)
    schema = io_.infer_csv_types([path], {"a": "int"})
    table, bad = io_.parse_csv_block(path, 0, os.path.getsize(path), schema, "skip")
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
    splits = io_.assign_splits(io_.row_hashes(table, ["user"]), {"train": 3, "eval": 1})
    users = {name: set(table.column("user").take(pa.array(rows)).to_pylist()) for name, rows in splits.items()}
    assert users["train"] and users["eval"] and not users["train"] & users["eval"]
    assert len(users["train"]) + len(users["eval"]) == 40
