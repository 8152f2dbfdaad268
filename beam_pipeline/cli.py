"""`beam-pipeline` command line: run a pipeline file, and the subcommands built on ML Metadata."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from typing import Any

# TensorFlow logs C++ errors while it loads (CUDA plugins "already registered", no GPU found) that
# say nothing about the run; level 3 keeps them out. Read once, when TensorFlow is first imported,
# which the CLI does only after this point. A user who sets the variable gets what they asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click

from beam_pipeline.dsl import Pipeline
from beam_pipeline.errors import BeamPipelineError
from beam_pipeline.pipeline_file import load_pipeline

# TFMA's precision/recall curves divide by empty threshold buckets on purpose (numpy gives inf/nan
# and TFMA handles it); only these messages, only from TFMA, so the pipeline's own warnings still show.
TFMA_NUMPY_NOISE = ("invalid value encountered in divide", "divide by zero encountered in divide")


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    """`KEY=VALUE` pairs from the command line as a dict; a pair without `=` is refused."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE", param_hint="--param")
        params[name] = value
    return params


def _quiet_libraries() -> None:
    """Keep library chatter out of a run's output: progress and summary are what a user reads."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for message in TFMA_NUMPY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=RuntimeWarning, module="tensorflow_model_analysis")
    for name in ("apache_beam", "tensorflow", "absl", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


class _Group(click.Group):
    """The command group; run as the console script, it leaves through `remote_fs.exit_now` once S3 was used.

    tensorflow-io's S3 filesystem aborts the interpreter at exit (see remote_fs.exit_now), which would
    turn every command that read s3:// into exit code 134. Only the console entry point (`main()`)
    comes through `__call__`; click's test runner calls `main.main(...)` and keeps its process.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.main(*args, **kwargs)
        except SystemExit as e:
            from beam_pipeline import remote_fs

            if remote_fs.used_s3():
                remote_fs.exit_now(e.code if isinstance(e.code, int) else int(e.code is not None))
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build, run and inspect ML pipelines compiled into one Apache Beam graph."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("pipeline_file", type=click.Path())
@click.option(
    "--runner",
    default=None,
    help="Beam runner preset or class: direct, portable, portable-local, "
    "dataflow, flink, spark (any other Beam option may follow and is passed through).",
)
@click.option("--pipeline-root", default=None, help="Override the pipeline root directory.")
@click.option(
    "--metadata-uri",
    envvar="BEAM_PIPELINE_METADATA_URI",
    default=None,
    help="ML Metadata store: a local SQLite path or mysql://user:pw@host:port/db "
    "(default: <root>/metadata.sqlite; required when the root is on an object store).",
)
@click.option("--no-cache", is_flag=True, help="Run every component even if a cached execution matches.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="An argument of the file's create_pipeline(), e.g. --param date=2026-12-01 (repeatable).",
)
@click.pass_context
def run(
    ctx: click.Context,
    pipeline_file: str,
    runner: str | None,
    pipeline_root: str | None,
    metadata_uri: str | None,
    no_cache: bool,
    params: tuple[str, ...],
) -> None:
    """Run PIPELINE_FILE as one Beam job and record it in ML Metadata."""
    _quiet_libraries()
    from beam_pipeline import launcher, progress
    from runners import options as runner_options

    try:
        pipeline = load_pipeline(pipeline_file, pipeline_root, parse_params(params))
        store_uri = launcher.metadata_uri_for(pipeline, metadata_uri)  # refused before anything runs
    except BeamPipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    display = progress.Progress(pipeline)
    _interrupt_on_signals()
    try:
        with runner_options.runner_args(runner, list(ctx.args)) as beam_args, display:
            result = launcher.run(
                pipeline,
                beam_args,
                metadata_uri=store_uri,
                enable_cache=False if no_cache else None,
                on_update=display.update,
            )
    except BeamPipelineError as e:
        click.echo(f"\nerror: {e}", err=True)
        _write_report(pipeline, store_uri, None)
        _exit(1)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: the run's unfinished executions are recorded CANCELED", err=True)
        _exit(130)
    display.summary(result)
    _write_report(pipeline, result.metadata_uri, result.run_id)
    _exit(0)


def _interrupt_on_signals() -> None:
    """SIGINT and SIGTERM both interrupt the run, whatever dispositions the process inherited
    (a job started in the background inherits SIGINT ignored), so its executions are ended."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def _exit(code: int) -> None:
    """Leave without interpreter teardown: TensorFlow's function finalizers print harmless but
    alarming tracebacks when they run after their modules were torn down."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _write_report(pipeline: Pipeline, metadata_uri: Any, run_id: str | None) -> None:
    """Write the run's static HTML report (also for a failed run, which then shows what failed)."""
    from apache_beam.io.filesystems import FileSystems

    from beam_pipeline import queries, report

    try:
        run_id = run_id or queries.latest_run_id(metadata_uri, pipeline.name)
        out_dir = FileSystems.join(pipeline.root, "reports", run_id)
        path = report.write_run_report(metadata_uri, pipeline.name, run_id, out_dir)
    except BeamPipelineError as e:
        click.echo(f"(no report: {e})", err=True)
        return
    click.echo(f"Report: {path}")


def _register_optional_commands() -> None:
    """Subcommands that live in their own modules (serving, metadata queries) join the group here."""
    for module_name, attr in (
        ("beam_pipeline.serving.cli", "serve"),
        ("beam_pipeline.inspect_cli", "commands"),
        ("beam_pipeline.export_cli", "commands"),
        ("beam_pipeline.ui.cli", "ui"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue
            raise
        found = getattr(module, attr)
        for command in found if isinstance(found, list) else [found]:
            main.add_command(command)


_register_optional_commands()

if __name__ == "__main__":
    main()
