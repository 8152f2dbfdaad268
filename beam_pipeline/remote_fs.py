"""Object stores for TensorFlow: `s3://` through tensorflow-io, configured from the environment Beam's S3 client reads.

Beam reaches S3 through boto3 (`apache-beam[aws]`), which honours `AWS_ENDPOINT_URL`, the AWS
credentials and `--s3_endpoint_url`. TensorFlow 2.16 has no S3 filesystem of its own: tensorflow-io
registers one on import, configured by `S3_ENDPOINT` / `S3_USE_HTTPS`. `enable_for` imports it when a
path needs it and derives those from `AWS_ENDPOINT_URL`, so one setting serves both. `gs://` needs
nothing: TensorFlow and Beam's GCS client both have it built in.

SDK workers import `beam_pipeline._s3_worker_plugin` first (Beam's `--beam_plugins`), so TFT, TFMA
and Keras code reading `s3://` on a worker finds the filesystem registered.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from urllib.parse import urlparse

WORKER_PLUGIN = "beam_pipeline._s3_worker_plugin"
_enabled: set[str] = set()


def scheme(path: str) -> str:
    """The URI scheme of `path` ('' for a local path)."""
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_remote(path: str) -> bool:
    """True for a path on an object store or other non-local filesystem (anything with a scheme but file://)."""
    return scheme(path) not in ("", "file")


def enable_for(paths: Iterable[str], beam_args: Iterable[str] = ()) -> list[str]:
    """Make every path's filesystem reachable in this process, for TensorFlow and for Beam's `FileSystems`
    (which needs pipeline options, e.g. `--s3_endpoint_url`, before it can open `s3://`); returns the
    Beam args SDK workers need too."""
    paths = [p for p in paths if p]
    if any(is_remote(p) for p in paths):
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.pipeline_options import PipelineOptions

        if FileSystems._pipeline_options is None:  # Beam sets it per pipeline; the driver needs it before
            FileSystems.set_options(PipelineOptions(list(beam_args)))
    if any(scheme(p) == "s3" for p in paths):
        enable_s3()
        return [f"--beam_plugins={WORKER_PLUGIN}"]
    return []


def enable_s3() -> None:
    """Register tensorflow-io's S3 filesystem, pointed at the endpoint boto3 would use."""
    if "s3" in _enabled:
        return
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "S3_ENDPOINT" not in os.environ:
        parsed = urlparse(endpoint)
        os.environ["S3_ENDPOINT"] = endpoint
        os.environ.setdefault("S3_USE_HTTPS", "0" if parsed.scheme == "http" else "1")
        os.environ.setdefault("S3_VERIFY_SSL", "0" if parsed.scheme == "http" else "1")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        os.environ.setdefault("AWS_REGION", region)
    try:
        import tensorflow_io  # noqa: F401  (registers the s3:// filesystem with TensorFlow)
    except ImportError as e:
        raise ImportError(
            "an s3:// path needs tensorflow-io for TensorFlow's side (pip install tensorflow-io==0.37.1)"
        ) from e
    _enabled.add("s3")


def used_s3() -> bool:
    """True once tensorflow-io's S3 filesystem was registered in this process."""
    return "s3" in _enabled


def exit_now(code: int) -> None:
    """Leave the process without C++ static destructors.

    tensorflow-io 0.37.1's S3 filesystem aborts the process at exit ("pure virtual method called",
    exit code 134; tensorflow/io#2039, fixed only in unreleased sources), which would turn every
    successful run that touched S3 into a failure. Output is flushed first; nothing else is pending.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
