"""Spans and versions: daily data ingested one span at a time, ranges, versions and date patterns."""

from __future__ import annotations

import csv
import os

import pytest

from beam_pipeline.errors import InputDataError, PipelineDefinitionError
from beam_pipeline.nodes import Resolver
from tests.conftest import PENGUIN_CSV
from tests.helpers import run_components, store_at
from transforms._spans import RangeConfig, SpanRange, select
from transforms.example_gen import ExampleGen, ReadExamples
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen

DAYS = 3


def _write_spans(base, rows_per_span: int = 100, layout: str = "span-{span}/data.csv") -> list[int]:
    """The penguin rows cut into DAYS consecutive spans of `rows_per_span` rows; rows per span written."""
    with open(PENGUIN_CSV, newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    counts = []
    for day in range(DAYS):
        chunk = rows[day * rows_per_span : (day + 1) * rows_per_span]
        path = base / layout.format(span=day + 1, day=day + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as out:
            csv.writer(out).writerows([header, *chunk])
        counts.append(len(chunk))
    return counts


def _daily(pattern: str, range_config: RangeConfig | None = None) -> list:
    gen = ExampleGen(input_base=pattern, range_config=range_config, splits={"train": 3, "eval": 1})
    stats = StatisticsGen(examples=gen.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    validator = ExampleValidator(
        statistics=stats.outputs.statistics,
        schema=schema.outputs.schema,
        drift_comparators={"species": 0.01},  # the species shift from day to day in this file's order
        drift_baseline="previous_run",
    )
    return [gen, stats, schema, validator]


def _rows(result) -> int:
    return sum(result.artifact("ExampleGen", "examples").properties["row_counts"].values())


def _statistics_counts(statistics) -> dict[str, int]:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    from beam_pipeline import artifact_io

    return {
        split: artifact_io.read_proto(
            artifact_io.split_file(statistics.uri, split, artifact_io.STATS_FILE),
            statistics_pb2.DatasetFeatureStatisticsList,
        )
        .datasets[0]
        .num_examples
        for split in statistics.split_names
    }


def _split_counts(result) -> dict[str, int]:
    return result.artifact("ExampleGen", "examples").properties["row_counts"]


def _split_rows(result, split: str) -> list[tuple]:
    """The rows of an Examples split, in a stable order."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(result.artifact("ExampleGen", "examples").uri, f"Split-{split}"))
    columns = table.to_pydict()
    return sorted(zip(*(columns[name] for name in sorted(columns)), strict=True), key=repr)


@pytest.mark.slow
def test_daily_spans_ingested_one_by_one_then_a_rolling_window_and_a_static_range(tmp_path):
    data, root = tmp_path / "data", tmp_path / "root"
    counts = _write_spans(data)
    pattern = str(data / "span-{SPAN}" / "*.csv")
    for day in (2, 3):  # the later days arrive later
        os.rename(data / f"span-{day}", data / f"later-{day}")

    first = run_components(root, _daily(pattern), name="daily")
    props = first.artifact("ExampleGen", "examples").properties
    assert (props["span"], props["spans"], props["version"]) == (1, [1], None)
    assert _rows(first) == counts[0]

    os.rename(data / "later-2", data / "span-2")
    second = run_components(root, _daily(pattern), name="daily")
    props = second.artifact("ExampleGen", "examples").properties
    assert (props["span"], props["spans"]) == (2, [2])
    assert _rows(second) == counts[1]  # only the new span was read
    # Day 2 is compared with day 1's statistics: the previous run's, the previous span's.
    anomalies = second.artifact("ExampleValidator", "anomalies").properties
    assert anomalies["anomaly_count"] >= 1

    os.rename(data / "later-3", data / "span-3")
    window = run_components(root, _daily(pattern, RangeConfig.rolling(2)), name="daily")
    props = window.artifact("ExampleGen", "examples").properties
    assert (props["span"], props["spans"]) == (3, [2, 3])
    assert _rows(window) == counts[1] + counts[2]
    # Only the new day is parsed: span 2 is read back from the second run's Parquet, and the rows
    # are those a run without any earlier Examples reads.
    assert props["spans_reused_from"] == {"2": second.artifact("ExampleGen", "examples").id}
    fresh = run_components(tmp_path / "fresh", _daily(pattern, RangeConfig.rolling(2)), name="daily")
    assert fresh.artifact("ExampleGen", "examples").properties["spans_reused_from"] == {}
    for split in ("train", "eval"):
        assert _split_rows(window, split) == _split_rows(fresh, split)

    # Span 1 again: the same files as the first run, so everything is reused from it.
    again = run_components(root, _daily(pattern, RangeConfig.static(1, 1)), name="daily")
    assert again.components["ExampleGen"].state == "CACHED"
    assert again.artifact("ExampleGen", "examples").id == first.artifact("ExampleGen", "examples").id

    # A Resolver picks Examples by span: the newest whose spans all lie in the range.
    store = store_at(root)
    assert SpanRange(2, 3).resolve(store, "daily").id == window.artifact("ExampleGen", "examples").id
    assert SpanRange(2, 2).resolve(store, "daily").id == second.artifact("ExampleGen", "examples").id
    assert SpanRange(4, 9).resolve(store, "daily") is None
    span_two = Resolver(SpanRange(2, 2), component_id="SpanTwo")
    stats = StatisticsGen(examples=span_two.outputs.examples, component_id="SpanTwoStats")
    resolved = run_components(root, [span_two, stats], name="daily")
    assert _statistics_counts(resolved.artifact("SpanTwoStats", "statistics")) == _split_counts(second)


def test_the_newest_version_of_each_span_is_read(tmp_path):
    counts = _write_spans(tmp_path, rows_per_span=40, layout="span-{span}/v-1/data.csv")
    _write_spans(tmp_path, rows_per_span=50, layout="span-{span}/v-2/data.csv")
    (tmp_path / "span-3" / "v-2" / "data.csv").unlink()  # span 3 has only its first version
    files, spans = select(str(tmp_path / "span-{SPAN}" / "v-{VERSION}" / "*.csv"), RangeConfig.rolling(3))
    assert spans.spans == [1, 2, 3] and spans.versions == {1: 2, 2: 2, 3: 1}
    assert [os.path.relpath(m.path, tmp_path) for m in files] == [
        "span-1/v-2/data.csv",
        "span-2/v-2/data.csv",
        "span-3/v-1/data.csv",
    ]
    assert counts == [40, 40, 40]


def test_a_date_pattern_gives_days_since_the_epoch_as_spans(tmp_path):
    _write_spans(tmp_path, rows_per_span=20, layout="2026-12-0{day}/data.csv")
    read = ReadExamples(str(tmp_path / "{YYYY}-{MM}-{DD}" / "*.csv"), range_config=RangeConfig.rolling(2))
    assert read.arrow_schema.names[0] == "species"
    files, spans = select(str(tmp_path / "{YYYY}-{MM}-{DD}" / "*.csv"), RangeConfig.latest())
    assert spans.spans == [20790]  # 2026-12-03
    assert [os.path.basename(os.path.dirname(m.path)) for m in files] == ["2026-12-03"]


def test_bad_span_configurations_are_refused_naming_what_is_wrong(tmp_path):
    _write_spans(tmp_path, rows_per_span=10)
    pattern = str(tmp_path / "span-{SPAN}" / "*.csv")
    with pytest.raises(InputDataError, match=r"spans \[4, 5\] have no files; spans found: \[1, 2, 3\]"):
        _ = ExampleGen(input_base=pattern, range_config=RangeConfig.static(3, 5)).files
    (tmp_path / "other" / "span-abc").mkdir(parents=True)
    (tmp_path / "other" / "span-abc" / "data.csv").write_text("a\n1\n")
    with pytest.raises(InputDataError, match="matches no file with a span"):
        select(str(tmp_path / "other" / "span-{SPAN}" / "*.csv"), RangeConfig.latest())
    with pytest.raises(PipelineDefinitionError, match="range_config needs spans in input_base"):
        ExampleGen(input_base=str(tmp_path / "*.csv"), range_config=RangeConfig.rolling(2))
    with pytest.raises(PipelineDefinitionError, match=r"use \{SPAN\} or a date, not both"):
        ExampleGen(input_base="d/{SPAN}/{YYYY}-{MM}-{DD}.csv")
    with pytest.raises(PipelineDefinitionError, match="needs a span"):
        ExampleGen(input_base="d/v-{VERSION}/*.csv")
    with pytest.raises(PipelineDefinitionError, match="expected at least one span"):
        RangeConfig.rolling(0)
    with pytest.raises(PipelineDefinitionError, match="the start is after the end"):
        SpanRange("2026-12-02", "2026-12-01")


def test_a_rolling_window_until_a_day_reads_that_day_and_the_days_before_it(tmp_path):
    """What a scheduled run of one logical date reads (a backfill of day 2 must not read day 3)."""
    _write_spans(tmp_path, rows_per_span=20, layout="2026-12-0{day}/data.csv")
    pattern = str(tmp_path / "{YYYY}-{MM}-{DD}" / "*.csv")
    files, spans = select(pattern, RangeConfig.rolling(2, until="2026-12-02"))
    assert spans.spans == [20788, 20789]
    assert [os.path.basename(os.path.dirname(m.path)) for m in files] == ["2026-12-01", "2026-12-02"]
    _, spans = select(pattern, RangeConfig.rolling(5, until="2026-12-01"))
    assert spans.spans == [20788]
    with pytest.raises(
        InputDataError, match=r"span 20795 \(2026-12-08\) has no files; spans found: \[20788, 20789, 20790\]"
    ):
        select(pattern, RangeConfig.rolling(2, until="2026-12-08"))
    with pytest.raises(PipelineDefinitionError, match="expected a span number or a YYYY-MM-DD date"):
        RangeConfig.rolling(2, until="yesterday")
    assert RangeConfig.rolling(1, until="7").until == 7
    assert RangeConfig.rolling(1, until="2026-12-02T00:00:00Z").until == 20789


def test_a_span_read_back_takes_the_types_a_new_day_widens_and_a_changed_span_is_parsed_again(tmp_path):
    data, root = tmp_path / "data", tmp_path / "root"
    (data / "span-1").mkdir(parents=True)
    (data / "span-1" / "d.csv").write_text("x,y\n" + "".join(f"{i},a{i}\n" for i in range(40)))
    pattern = str(data / "span-{SPAN}" / "*.csv")

    def run():
        gen = ExampleGen(input_base=pattern, range_config=RangeConfig.rolling(2))
        return run_components(root, [gen], name="widen").artifact("ExampleGen", "examples")

    first = run()
    (data / "span-2").mkdir()
    (data / "span-2" / "d.csv").write_text("x,y\n" + "".join(f"{i}.5,b{i}\n" for i in range(40)))
    window = run()
    assert window.properties["spans_reused_from"] == {"1": first.id}
    assert window.properties["column_type_notes"] == [
        "column 'x' read as float64: span 2 holds float64 values, span 1 only int64 ones"
    ]
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(window.uri, "Split-train"))
    assert str(table.schema.field("x").type.value_type) == "float"  # ExampleGen's float layout
    xs = sorted(v for row in table.column("x").to_pylist() for v in row)
    assert 0.0 in xs and 0.5 in xs  # span 1's ints, now floats, next to span 2's floats
    assert sum(window.properties["row_counts"].values()) == 80

    (data / "span-2" / "d.csv").write_text("x,y\n" + "".join(f"{i}.5,c{i}\n" for i in range(30)))
    again = run()  # span 2 changed: parsed again; span 1 is still unchanged in the window's Examples
    assert again.properties["spans_reused_from"] == {"1": window.id}
    assert sum(again.properties["row_counts"].values()) == 70


def test_scans_of_spans_merged_are_the_scan_of_all_their_files(tmp_path):
    from transforms._csv_scan import merge_scans, scan_csv

    days = [
        "a,b,c\n,1,x\n,2,y\n",  # a: no value yet
        "a,b,c\n3,1.5,z\n",  # a: int; b: widened to float
        "a,b,c\n4,2,w\n",
    ]
    paths = []
    for i, text in enumerate(days):
        path = tmp_path / f"d{i}.csv"
        path.write_text(text)
        paths.append(str(path))
    merged = merge_scans([scan_csv([p]) for p in paths])
    assert merged.schema == scan_csv(paths).schema
    assert [str(f.type) for f in merged.schema] == ["int64", "double", "string"]
