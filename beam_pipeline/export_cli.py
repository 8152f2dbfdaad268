"""`beam-pipeline export airflow|kubeflow`: hand a pipeline file to an orchestrator that runs it on a schedule."""

from __future__ import annotations

import datetime
import os
import shlex
import sys
import tempfile

import click

from beam_pipeline.errors import BeamPipelineError


def _write(path: str, data: bytes) -> None:
    """Write the exported file through FileSystems (a DAG bucket on gs:// works like a local dags folder)."""
    from apache_beam.io.filesystems import FileSystems

    directory = os.path.dirname(path)
    if directory and "://" not in path:
        os.makedirs(directory, exist_ok=True)
    with FileSystems.create(path) as f:
        f.write(data)


def _common(function):
    """The options both exports take: what `beam-pipeline run` itself takes, given once for every run."""
    for option in reversed(
        [
            click.argument("pipeline_file", type=click.Path()),
            click.option("--output", "-o", required=True, help="Where to write the exported file."),
            click.option("--pipeline-root", default=None, help="The runs' pipeline root."),
            click.option("--metadata-uri", default=None, help="The runs' ML Metadata store."),
            click.option("--runner", default=None, help="The runs' Beam runner (as for `run`)."),
            click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="A fixed parameter."),
            click.option(
                "--date-param",
                default=None,
                help="The create_pipeline() parameter that gets each run's date (default: `date` if it takes one).",
            ),
            click.option("--command", default=None, help="How the task starts beam-pipeline (default: see each)."),
        ]
    ):
        function = option(function)
    return click.pass_context(function)


def _launch(ctx: click.Context, pipeline_file, params, pipeline_root, metadata_uri, runner, date_param, command, **kw):
    from beam_pipeline.cli import parse_params
    from beam_pipeline.export_common import launch_command

    beam_args = (("--runner", runner) if runner else ()) + tuple(ctx.args)
    return launch_command(
        pipeline_file,
        params=parse_params(params),
        pipeline_root=pipeline_root,
        metadata_uri=metadata_uri,
        beam_args=beam_args,
        date_param=date_param,
        command=tuple(shlex.split(command)) if command else None,
        **kw,
    )


def _fail(e: BeamPipelineError) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


@click.group()
def export() -> None:
    """Write a pipeline file as an orchestrator's job: an Airflow DAG or a Kubeflow pipeline."""


_EXTRA = {"ignore_unknown_options": True, "allow_extra_args": True}


@export.command(context_settings=_EXTRA)
@_common
@click.option("--schedule", default="@daily", show_default=True, help="Airflow schedule (preset or cron).")
@click.option(
    "--start-date",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="The first logical date (default: today).",
)
@click.option("--catchup/--no-catchup", default=False, show_default=True, help="Run the days since start-date.")
@click.option("--retries", type=int, default=1, show_default=True)
@click.option("--dag-id", default=None, help="Default: the pipeline's name.")
def airflow(ctx, output, schedule, start_date, catchup, retries, dag_id, **options) -> None:
    """An Airflow DAG running PIPELINE_FILE once per logical date, as one Beam job (default command: this
    installation's beam-pipeline, which the Airflow workers must reach)."""
    from beam_pipeline.export_airflow import airflow_dag

    start = (start_date or datetime.datetime.now(datetime.UTC)).date()
    try:
        launch = _launch(ctx, sample_date=start.isoformat(), **options)
    except BeamPipelineError as e:
        _fail(e)
    text = airflow_dag(launch, schedule=schedule, start_date=start, catchup=catchup, retries=retries, dag_id=dag_id)
    _write(output, text.encode("utf-8"))
    click.echo(f"Airflow DAG {dag_id or launch.pipeline_name!r}: {output}")


@export.command(context_settings=_EXTRA)
@_common
@click.option("--image", required=True, help="A container image with beam-pipeline and the pipeline file in it.")
def kubeflow(ctx, output, image, **options) -> None:
    """A Kubeflow Pipelines v2 spec (YAML, compiled by the kfp SDK) running PIPELINE_FILE, its path as the
    image has it, in IMAGE (default command: `beam-pipeline` on the image's PATH)."""
    from beam_pipeline.export_kubeflow import check_shared_storage, compile_kubeflow

    options["command"] = options["command"] or "beam-pipeline"
    try:
        check_shared_storage(options["pipeline_root"], options["metadata_uri"])
        launch = _launch(ctx, file_as_given=True, **options)
    except BeamPipelineError as e:
        _fail(e)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = os.path.join(tmp, "pipeline.yaml")
        compile_kubeflow(launch, image=image, output_path=compiled)
        with open(compiled, "rb") as f:
            _write(output, f.read())
    click.echo(f"Kubeflow pipeline {launch.pipeline_name!r}: {output}")


commands = [export]
