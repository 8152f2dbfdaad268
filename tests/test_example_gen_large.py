"""ExampleGen on a ~100 MB CSV whose last row holds the only float of one column and the only word of another."""

from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.helpers import run_components
from transforms.example_gen import ExampleGen

ROWS = 2_600_000  # ~104 MB
QUARTER = ROWS // 4  # a row no start/middle/end sample would see


def _row(i: int) -> str:
    if i == QUARTER:
        return f"{i},{i}.25,quarter,{i}\n"
    return f"{i},{i},station-{i % 13:04d}-north,{i}\n"


def _write_big_csv(path) -> int:
    """Rows `i,i,station-NNNN-north,i`, all integers but two: row QUARTER has a float in `b`, and
    the last row a float in `a` and a word in `d`."""
    with open(path, "w") as f:
        f.write("a,b,c,d\n")
        chunk = 200_000
        for start in range(0, ROWS - 1, chunk):
            f.write("".join(_row(i) for i in range(start, min(start + chunk, ROWS - 1))))
        f.write(f"{ROWS - 1}.5,0,last,late\n")
    return os.path.getsize(path)


@pytest.mark.slow
def test_a_float_and_a_word_first_seen_in_the_last_row_of_100mb_keep_every_row(tmp_path):
    data = tmp_path / "big.csv"
    assert _write_big_csv(data) > 95 << 20
    gens = [
        ExampleGen(input_base=str(data), on_bad_record="error").with_id("strict"),
        ExampleGen(input_base=str(data), on_bad_record="skip").with_id("lenient"),
    ]
    result = run_components(tmp_path / "root", gens)
    for gen in gens:
        examples = result.artifact(gen.id, "examples")
        assert sum(examples.properties["row_counts"].values()) == ROWS, gen.id
        assert examples.properties["bad_records"] == 0, gen.id
        notes = examples.properties["column_type_notes"]
        assert any("column 'a' read as float64" in n and f"data row {ROWS}" in n for n in notes), notes
        assert any("column 'b' read as float64" in n and f"data row {QUARTER + 1}" in n for n in notes), notes
        assert any("column 'd' read as string" in n and "'late', not an integer" in n for n in notes), notes
        schema = pq.read_schema(sorted(glob.glob(os.path.join(examples.uri, "Split-train", "*.parquet")))[0])
        assert schema.field("a").type == schema.field("b").type == pa.large_list(pa.float32())
        assert schema.field("d").type == pa.large_list(pa.large_binary())
    # The rows that widened a column are in the output of both, with their values.
    for gen in gens:
        uri = result.artifact(gen.id, "examples").uri
        found = []
        for split in ("train", "eval"):
            table = pq.read_table(os.path.join(uri, f"Split-{split}"), columns=["c", "a", "b", "d"])
            mask = pc.is_in(pc.list_element(table.column("c"), 0), pa.array([b"last", b"quarter"]))
            found += table.filter(mask).to_pylist()
        assert sorted(found, key=lambda r: r["c"]) == [
            {"c": [b"last"], "a": [ROWS - 1 + 0.5], "b": [0.0], "d": [b"late"]},
            {"c": [b"quarter"], "a": [float(QUARTER)], "b": [QUARTER + 0.25], "d": [str(QUARTER).encode()]},
        ], gen.id
