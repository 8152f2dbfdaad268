"""`beam-pipeline ui`: the metadata web UI on a local port, over the store of a pipeline root or a metadata URI."""

from __future__ import annotations

import socket
import sys

import click

from beam_pipeline.errors import BeamPipelineError


@click.command()
@click.option("--pipeline-root", default=None, help="Read <root>/metadata.sqlite.")
@click.option(
    "--metadata-uri",
    envvar="BEAM_PIPELINE_METADATA_URI",
    default=None,
    help="The ML Metadata store: a SQLite path or mysql://user:pw@host:port/db.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; loopback by default.")
def ui(pipeline_root: str | None, metadata_uri: str | None, port: int, host: str) -> None:
    """Browse runs, executions, artifacts, lineage, statistics and models in ML Metadata, read only."""
    import uvicorn

    from beam_pipeline import queries
    from beam_pipeline.ui.app import create_app

    try:
        uri = queries.store_uri(metadata_uri, pipeline_root)
        queries.open_store(uri)  # a store that is not there fails here, not on the first page
    except BeamPipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        click.echo(f"error: cannot listen on {host}:{port}: {e.strerror}", err=True)
        sys.exit(1)
    bound = sock.getsockname()[1]
    # The first line says where: a script (or a test) started with --port 0 reads the port from it.
    click.echo(f"beam-pipeline ui: http://{host}:{bound}/ (ML Metadata {uri})", err=False)
    sys.stdout.flush()
    server = uvicorn.Server(uvicorn.Config(create_app(uri), log_level="warning"))
    server.run(sockets=[sock])
