"""Resample the taxi sample to N rows with jitter, so benchmarks run on realistic data of any size.

Vectorized: rows are drawn with replacement, continuous columns get small multiplicative noise,
and pyarrow writes the CSV. Missing values stay missing (empty fields), as in the sample.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(os.path.dirname(HERE), "examples", "chicago_taxi", "data", "data.csv")
JITTER = {
    "fare": 0.05,
    "trip_miles": 0.05,
    "trip_seconds": 0.05,
    "tips": 0.05,
    "pickup_latitude": 1e-5,
    "pickup_longitude": 1e-5,
    "dropoff_latitude": 1e-5,
    "dropoff_longitude": 1e-5,
}


CHUNK_ROWS = 1_000_000


def scale(rows: int, out: str, seed: int = 0, sample: str = SAMPLE) -> str:
    """Write `rows` resampled rows to `out` (reused if it already has that many rows).

    Written a million rows at a time, so 50M rows need no more memory than one million.
    """
    marker = f"{out}.rows"
    if os.path.exists(out) and os.path.exists(marker) and open(marker).read() == str(rows):
        return out
    table = pv.read_csv(sample, convert_options=pv.ConvertOptions(strings_can_be_null=True))
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)
    with pv.CSVWriter(out, table.schema) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            writer.write_table(_resample(table, min(CHUNK_ROWS, rows - start), rng))
    with open(marker, "w") as f:
        f.write(str(rows))
    return out


def _resample(table: pa.Table, rows: int, rng: np.random.Generator) -> pa.Table:
    table = table.take(pa.array(rng.integers(0, table.num_rows, rows)))
    columns = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name in JITTER and (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            noise = 1 + rng.normal(0, JITTER[name], rows)
            jittered = pc.multiply(col.cast(pa.float64()), pa.array(noise))
            if pa.types.is_floating(col.type):
                col = pc.round(jittered, 6 if "itude" in name else 2)
            else:
                col = pc.round(jittered).cast(col.type)
        columns[name] = col
    return pa.table(columns, schema=table.schema)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=510_000)
    parser.add_argument("--out", default=os.path.join(HERE, "data", "taxi_510k.csv"))
    args = parser.parse_args()
    print(scale(args.rows, args.out))
