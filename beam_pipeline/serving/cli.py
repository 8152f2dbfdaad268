"""`beam-pipeline serve`: the model server's command line, with TF Serving's flag names where they exist."""

from __future__ import annotations

import signal
import sys

import click

from beam_pipeline import remote_fs
from beam_pipeline.serving.names import parse_version_labels


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_on_signals() -> None:
    """Make SIGINT and SIGTERM stop the server whatever the process inherited.

    A command started from a background shell job inherits SIGINT ignored (and dispositions or a signal
    mask survive exec), so without this Ctrl-C-style stops are lost. While uvicorn runs it handles both
    signals itself (a graceful shutdown), then re-raises the signal into these handlers.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _labels(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dict[str, int]:
    try:
        return parse_version_labels(value or "")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("serve")
@click.option(
    "--model_base_path",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory holding <version>/saved_model.pb, as the Pusher writes it: a local path, s3://… or gs://….",
)
@click.option("--model_name", default="default", show_default=True, help="Name in the /v1/models/NAME URLs.")
@click.option("--port", type=click.IntRange(0, 65535), default=8501, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 for all.")
@click.option(
    "--enable_batching/--no-enable_batching",
    default=True,
    show_default=True,
    help="Merge concurrent requests into one model call.",
)
@click.option(
    "--max_batch_size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Most rows in one batched model call.",
)
@click.option(
    "--batch_timeout_ms",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Longest a request waits for others to batch with when the model is idle.",
)
@click.option(
    "--poll_interval_s",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="How often to look for new versions; 0 loads once at startup only.",
)
@click.option(
    "--max_request_bytes",
    type=click.IntRange(min=1),
    default=10 * 1024 * 1024,
    show_default=True,
    help="Larger request bodies are refused with 413.",
)
@click.option(
    "--num_versions",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many of the newest versions to keep loaded (the newest is the default).",
)
@click.option(
    "--model_version_labels",
    callback=_labels,
    default=None,
    metavar="LABEL=V[,LABEL=V]",
    help="Version labels such as stable=3,canary=4; labelled versions are kept loaded.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes sharing the port, each with its own copy of the model and its own batching "
    "(processes, not threads, are how Python uses more cores).",
)
@click.option(
    "--log_level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def serve(
    model_base_path: str,
    model_name: str,
    port: int,
    host: str,
    enable_batching: bool,
    max_batch_size: int,
    batch_timeout_ms: float,
    poll_interval_s: float,
    max_request_bytes: int,
    num_versions: int,
    model_version_labels: dict[str, int],
    workers: int,
    log_level: str,
) -> None:
    """Serve the pushed SavedModels under MODEL_BASE_PATH over TF Serving's REST API."""
    _stop_on_signals()
    try:
        # Imported here because it imports TensorFlow, which `beam-pipeline --help` should not wait for.
        from beam_pipeline.serving import server

        server.serve(
            model_base_path,
            model_name,
            host=host,
            port=port,
            log_level=log_level,
            workers=workers,
            enable_batching=enable_batching,
            max_batch_size=max_batch_size,
            batch_timeout_ms=batch_timeout_ms,
            poll_interval_s=poll_interval_s,
            max_request_bytes=max_request_bytes,
            num_versions=num_versions,
            version_labels=model_version_labels,
        )
    except ValueError as e:  # bad configuration, e.g. a model name outside the allowed characters
        _leave_if_s3_was_used(2, f"Error: {e}")
        raise click.UsageError(str(e)) from None
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM: a stop on request (after a graceful shutdown if serving)
        click.echo(f"stopped by {e or 'SIGINT'}", err=True)
        _leave_if_s3_was_used(0)
        sys.exit(0)
    _leave_if_s3_was_used(0)


def _leave_if_s3_was_used(code: int, message: str | None = None) -> None:
    """Exit now, skipping interpreter teardown, if this process used S3: tensorflow-io would abort it (exit 134)."""
    if remote_fs.used_s3():
        if message:
            click.echo(message, err=True)
        remote_fs.exit_now(code)
