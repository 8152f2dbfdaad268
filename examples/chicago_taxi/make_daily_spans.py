"""Cut the taxi sample into consecutive days of data, `<out>/YYYY-MM-DD/data.csv`, as daily_pipeline.py reads them.

    python examples/chicago_taxi/make_daily_spans.py --days 3 --last-day 2026-12-01 --out data/daily

The rows are dealt out in file order, so each day has the sample's mix (a stand-in for a day of trips).
"""

from __future__ import annotations

import argparse
import datetime
import os

from apache_beam.io.filesystems import FileSystems

HERE = os.path.dirname(os.path.abspath(__file__))


def write_days(source: str, out: str, days: int, last_day: datetime.date, rows_per_day: int | None = None) -> list[str]:
    """Write `days` days ending at `last_day`, `rows_per_day` rows each (default: all rows, shared out); their paths."""
    with FileSystems.open(source) as f:
        header, *rows = f.read().decode("utf-8").splitlines(keepends=True)
    per_day = rows_per_day or len(rows) // days
    if per_day * days > len(rows):
        raise ValueError(f"{source} has {len(rows)} rows, fewer than {days} days x {per_day} rows")
    paths = []
    for i in range(days):
        day = last_day - datetime.timedelta(days=days - 1 - i)
        path = FileSystems.join(out, day.isoformat(), "data.csv")
        with FileSystems.create(path) as f:
            f.write((header + "".join(rows[i * per_day : (i + 1) * per_day])).encode("utf-8"))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=os.path.join(HERE, "data", "data.csv"))
    parser.add_argument("--out", default=os.path.join(HERE, "data", "daily"))
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--last-day", type=datetime.date.fromisoformat, default=datetime.date.today())
    parser.add_argument("--rows-per-day", type=int, default=None)
    args = parser.parse_args()
    for path in write_days(args.source, args.out, args.days, args.last_day, args.rows_per_day):
        print(path)


if __name__ == "__main__":
    main()
