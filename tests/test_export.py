"""Run parameters and the orchestrator exports: an Airflow DAG that Airflow runs, a Kubeflow spec that kfp loads."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from beam_pipeline.cli import main
from beam_pipeline.errors import PipelineDefinitionError
from beam_pipeline.pipeline_file import load_pipeline
from tests.conftest import ROOT, TAXI_CSV
from tests.helpers import needs, store_at

DAILY_PIPELINE = os.path.join(ROOT, "examples", "chicago_taxi", "daily_pipeline.py")
AIRFLOW_VENV = os.environ.get("BEAM_PIPELINE_AIRFLOW_VENV", os.path.join(ROOT, ".venv-airflow"))
AIRFLOW = os.path.join(AIRFLOW_VENV, "bin", "airflow")
needs_airflow = needs(os.path.exists(AIRFLOW), f"no Airflow at {AIRFLOW} (make .venv-airflow/.installed)")

PARAMETERIZED = textwrap.dedent(
    """
    from beam_pipeline import Pipeline
    from transforms.example_gen import ExampleGen

    def create_pipeline(pipeline_root="root", data="data.csv", steps=10, rate=0.5, verbose=False):
        gen = ExampleGen(input_base=data)
        return Pipeline(f"p-{steps}-{rate}-{verbose}", pipeline_root, [gen])
    """
)


@pytest.fixture
def parameterized(tmp_path):
    path = tmp_path / "parameterized.py"
    path.write_text(PARAMETERIZED)
    return str(path)


def test_run_parameters_are_typed_like_create_pipelines_defaults(parameterized):
    pipeline = load_pipeline(parameterized, params={"steps": "7", "rate": "0.25", "verbose": "true"})
    assert pipeline.name == "p-7-0.25-True"
    assert load_pipeline(parameterized).name == "p-10-0.5-False"
    with pytest.raises(PipelineDefinitionError, match=r"no parameter 'step' \(it takes: data, steps, rate, verbose\)"):
        load_pipeline(parameterized, params={"step": "7"})
    with pytest.raises(PipelineDefinitionError, match=r"parameter steps='seven' is not a int"):
        load_pipeline(parameterized, params={"steps": "seven"})
    with pytest.raises(PipelineDefinitionError, match=r"parameter verbose='yes' is not a bool"):
        load_pipeline(parameterized, params={"verbose": "yes"})


def test_run_refuses_a_parameter_without_a_value(parameterized):
    result = CliRunner().invoke(main, ["run", parameterized, "--param", "steps"])
    assert result.exit_code == 2
    assert "'steps': expected NAME=VALUE" in result.output


def _export(*args: str) -> subprocess.CompletedProcess:
    """The export as a user runs it: the console command in its own process."""
    command = [sys.executable, "-m", "beam_pipeline", "export", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _write_days(data_root, days: int = 3, last_day: str = "2026-12-01", rows: int = 2000) -> None:
    sys.path.insert(0, os.path.dirname(DAILY_PIPELINE))
    try:
        from make_daily_spans import write_days
    finally:
        sys.path.pop(0)
    write_days(TAXI_CSV, str(data_root), days, datetime.date.fromisoformat(last_day), rows)


def test_the_kubeflow_spec_compiles_and_loads_back_with_kfps_loader(tmp_path):
    from google.protobuf import json_format
    from kfp import components

    out = tmp_path / "taxi_daily.yaml"
    done = _export(
        "kubeflow",
        "examples/chicago_taxi/daily_pipeline.py",
        "--output",
        str(out),
        "--image",
        "registry.example/beam-pipeline:1",
        "--pipeline-root",
        "s3://bucket/taxi",
        "--metadata-uri",
        "mysql://mlmd:pw@mlmd-db:3306/mlmd",
        "--param",
        "train_steps=500",
        "--runner",
        "flink",
        "--flink_master=flink-jobmanager:8081",
    )
    assert done.returncode == 0, done.stderr
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "chicago-taxi-daily"
    spec = loaded.pipeline_spec
    assert dict(spec.root.input_definitions.parameters)["date"].default_value.string_value == ""
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    assert len(executors) == 2  # the scheduled branch and the given-date branch
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == "registry.example/beam-pipeline:1"
        assert container["command"] == ["beam-pipeline"]
        args = container["args"]
        assert args[:4] == ["run", "examples/chicago_taxi/daily_pipeline.py", "--pipeline-root", "s3://bucket/taxi"]
        assert args[args.index("--metadata-uri") + 1] == "mysql://mlmd:pw@mlmd-db:3306/mlmd"
        assert "train_steps=500" in args and args[-3:] == ["--runner", "flink", "--flink_master=flink-jobmanager:8081"]
        date_word = json.loads(next(a for a in args if a.startswith('{"Concat"')))
        assert date_word["Concat"] == ["date=", "{{$.inputs.parameters['date']}}"]
    text = out.read_text()
    assert "{{$.pipeline_job_schedule_time_utc}}" in text  # an empty date takes the schedule's time
    # KFP's cache is off (it keys on parameters, blind to a day's new files); ML Metadata's is by content.
    assert text.count("cachingOptions: {}") == 2 and "enableCache: true" not in text


def test_kubeflow_export_refuses_storage_a_pod_cannot_share(tmp_path):
    base = ["kubeflow", DAILY_PIPELINE, "--output", str(tmp_path / "x.yaml"), "--image", "i:1"]
    local = _export(*base, "--pipeline-root", str(tmp_path), "--metadata-uri", "mysql://u:p@h:3306/m")
    assert local.returncode == 1 and "a Kubeflow run's pod has a disk of its own" in local.stderr
    sqlite = _export(*base, "--pipeline-root", "gs://b/r", "--metadata-uri", str(tmp_path / "m.sqlite"))
    assert sqlite.returncode == 1 and "needs ML Metadata on a server every pod reaches" in sqlite.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_airflow_export_checks_the_file_and_its_parameters_before_writing(tmp_path, parameterized):
    out = tmp_path / "dag.py"
    fixed = _export("airflow", DAILY_PIPELINE, "-o", str(out), "--param", "date=2026-12-01")
    assert fixed.returncode == 1 and "the schedule sets 'date', each run its own" in fixed.stderr
    unknown = _export("airflow", DAILY_PIPELINE, "-o", str(out), "--param", "train_step=5")
    assert unknown.returncode == 1 and "no parameter 'train_step'" in unknown.stderr
    no_date = _export("airflow", parameterized, "-o", str(out), "--date-param", "day")
    assert no_date.returncode == 1 and "--date-param 'day': create_pipeline() has no such parameter" in no_date.stderr
    assert not out.exists()
    # A pipeline without a date parameter is scheduled as it is: no date word in its command.
    plain = _export("airflow", parameterized, "-o", str(out), "--param", "steps=3")
    assert plain.returncode == 0, plain.stderr
    assert "--param steps=3" in out.read_text() and "{{ ds }}" not in out.read_text()


def _airflow(home, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
    )
    env.pop("PYTHONPATH", None)  # Airflow's venv, not ours
    return subprocess.run([AIRFLOW, *args], capture_output=True, text=True, timeout=timeout, env=env)


_DAGBAG = "import json, sys; from airflow.models import DagBag; b = DagBag(sys.argv[1], include_examples=False); "
_DAGBAG += "print(json.dumps({'errors': {k: str(v) for k, v in b.import_errors.items()}, 'dags': b.dag_ids}))"


@pytest.mark.slow
@needs_airflow
def test_the_daily_taxi_pipeline_under_airflow_reads_the_days_of_its_logical_date(tmp_path):
    """`airflow dags test` of the exported DAG for 2026-11-30, with 11-29..12-01 present: the run reads
    the window of two days ending at 11-30 (not the newest day), so a backfill reads its own days."""
    data, root, home = tmp_path / "daily", tmp_path / "root", tmp_path / "airflow"
    _write_days(data)
    (home / "dags").mkdir(parents=True)
    dag_file = home / "dags" / "chicago_taxi_daily.py"
    exported = _export(
        "airflow",
        DAILY_PIPELINE,
        "-o",
        str(dag_file),
        "--pipeline-root",
        str(root),
        "--param",
        f"data_root={data}",
        "--param",
        "train_steps=50",
        "--start-date",
        "2026-11-29",
    )
    assert exported.returncode == 0, exported.stderr

    bag = subprocess.run(
        [os.path.join(AIRFLOW_VENV, "bin", "python"), "-c", _DAGBAG, str(home / "dags")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False"),
    )
    assert bag.returncode == 0, bag.stderr
    assert json.loads(bag.stdout.strip().splitlines()[-1]) == {"errors": {}, "dags": ["chicago_taxi_daily"]}

    migrated = _airflow(home, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    ran = _airflow(home, "dags", "test", "chicago_taxi_daily", "2026-11-30")
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-5000:]
    assert "state=success" in ran.stdout + ran.stderr

    examples = [a for a in store_at(root).latest_artifacts("Examples", "chicago_taxi_daily") if "spans" in a.properties]
    assert len(examples) == 1  # ExampleGen's (Transform's are Examples too, without spans)
    span = (datetime.date(2026, 11, 30) - datetime.date(1970, 1, 1)).days
    assert (examples[0].properties["span"], examples[0].properties["spans"]) == (span, [span - 1, span])
    assert sum(examples[0].properties["row_counts"].values()) == 4000
