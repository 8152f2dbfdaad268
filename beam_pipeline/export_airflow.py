"""`beam-pipeline export airflow`: an Airflow DAG file that runs a pipeline file on a schedule, one Beam job per run."""

from __future__ import annotations

import datetime
import shlex

from beam_pipeline.export_common import LaunchCommand

# The DAG file is written for the Airflow it is loaded by, not imported here: Airflow lives in its own
# environment (its pins are not ours), and the task launches this project's command line.
_DAG_TEMPLATE = '''"""Airflow DAG for the beam-pipeline pipeline {name!r}, written by `beam-pipeline export airflow`.

Each DAG run launches the whole pipeline file
    {file}
as one Beam job, with the run's logical date as its `{date_param}` parameter, so a backfill of an old
day reads that day's spans. The pipeline records itself in ML Metadata; a rerun of a finished day is
served from its cache.
"""

import datetime

from airflow import DAG
from airflow.operators.bash import BashOperator

with DAG(
    dag_id={dag_id!r},
    schedule={schedule!r},
    start_date=datetime.datetime({start.year}, {start.month}, {start.day}, tzinfo=datetime.timezone.utc),
    catchup={catchup!r},
    # One run at a time: runs of one pipeline share its ML Metadata store and its serving directory.
    max_active_runs=1,
    default_args={{"retries": {retries!r}, "retry_delay": datetime.timedelta(minutes=5)}},
    tags=["beam-pipeline"],
) as dag:
    BashOperator(
        task_id="run_pipeline",
        bash_command={command!r},
        append_env=True,
        env={{"TF_USE_LEGACY_KERAS": "1"}},
    )
'''


def airflow_dag(
    launch: LaunchCommand,
    *,
    schedule: str,
    start_date: datetime.date,
    catchup: bool = False,
    retries: int = 1,
    dag_id: str | None = None,
) -> str:
    """The text of a DAG file whose one task runs `launch` with `{{ ds }}` as the date parameter."""
    argv = launch.argv(date="{{ ds }}")
    # Jinja renders `{{ ds }}` inside the quoted word; every other word is quoted for the shell.
    command = " ".join(shlex.quote(word) for word in argv)
    return _DAG_TEMPLATE.format(
        name=launch.pipeline_name,
        file=launch.pipeline_file,
        date_param=launch.date_param,
        dag_id=dag_id or launch.pipeline_name,
        schedule=schedule,
        start=start_date,
        catchup=catchup,
        retries=retries,
        command=command,
    )
