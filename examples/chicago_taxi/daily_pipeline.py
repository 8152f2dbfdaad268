"""The Chicago taxi pipeline on daily spans: each run reads the window of days ending at its date.

New data lands as one directory a day, `<data root>/YYYY-MM-DD/*.csv` (`make_daily_spans.py` cuts
the sample into such days). A run for a date trains on that day and the days before it:

    beam-pipeline run examples/chicago_taxi/daily_pipeline.py --param date=2026-12-01

Without `date` it reads the newest days there are. To run it every day under Airflow:

    beam-pipeline export airflow examples/chicago_taxi/daily_pipeline.py --schedule @daily \\
        --start-date 2026-12-01 --output ~/airflow/dags/chicago_taxi_daily.py

which passes each run's logical date (`{{ ds }}`) as `date`, so a backfill reads its own days.
"""

from __future__ import annotations

import importlib.util
import os

from beam_pipeline import Pipeline
from transforms.example_gen import RangeConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def _taxi_pipeline_module():
    """The sibling pipeline.py, by path: a bare `import pipeline` could find another example's."""
    spec = importlib.util.spec_from_file_location("_chicago_taxi_pipeline", os.path.join(HERE, "pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def create_pipeline(
    pipeline_root: str = os.environ.get("PIPELINE_ROOT", os.path.join(os.getcwd(), "pipelines", "chicago_taxi_daily")),
    data_root: str = os.environ.get("TAXI_DAILY_DATA", os.path.join(HERE, "data", "daily")),
    date: str = "",
    window_days: int = 2,
    train_steps: int = int(os.environ.get("TAXI_TRAIN_STEPS", "1000")),
    warm_start: bool = False,
    serving_model_dir: str = "",
) -> Pipeline:
    """`date` (YYYY-MM-DD, empty for the newest day) ends a window of `window_days` days of data."""
    taxi = _taxi_pipeline_module()
    return taxi.create_pipeline(
        pipeline_root=pipeline_root,
        data_path=os.path.join(data_root, "{YYYY}-{MM}-{DD}", "*.csv"),
        range_config=RangeConfig.rolling(window_days, until=date or None),
        train_steps=train_steps,
        serving_model_dir=serving_model_dir or None,
        module_file=taxi.MODULE_FILE,
        name="chicago_taxi_daily",
        warm_start=warm_start,
    )
