"""Before anything runs: can the runner the Beam arguments select work as configured? Errors say what to pass.

Checked for PortableRunner, FlinkRunner and SparkRunner (presets `portable`, `flink`, `spark`, or the
class names): every endpoint named (`--job_endpoint`, `--flink_master`, `--spark_master_url`,
`--spark_rest_url`) accepts a TCP connection within a few seconds; the job server jar Beam would
start (`--flink_job_server_jar` / `--spark_job_server_jar`, else the default one Beam downloads from
Maven, unless it is in Beam's jar cache) is a jar file or a URL that answers; `java` is on PATH when
Beam must start a Java job server; `--sdk_worker_parallelism` is a count. Every problem is reported
at once. With `--job_endpoint` given, Flink and Spark submit to that job server, and its master and
jar are its own business.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from urllib.parse import urlsplit

from beam_pipeline.errors import BeamPipelineError

CONNECT_TIMEOUT_S = 3.0
DOWNLOAD_CHECK_TIMEOUT_S = 10.0
# FlinkRunner's names for "start a Flink cluster inside the job server" (flink_runner.MAGIC_HOST_NAMES).
FLINK_EMBEDDED_MASTERS = ("[auto]", "[local]")
# SparkRunner's pattern for "run Spark inside the job server" (spark_runner.LOCAL_MASTER_PATTERN).
SPARK_LOCAL_MASTER = re.compile(r"^local(\[.+\])?$")
DEFAULT_PORTS = {"http": 80, "https": 443, "spark": 7077}


class RunnerConfigError(BeamPipelineError):
    """The runner cannot work as configured; the message names each option and what to pass instead."""


def check(args: Sequence[str]) -> None:
    """Raise RunnerConfigError listing every problem with the runner `args` select (none: return)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(list(args))
    runner = (options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1]
    checks = {"portablerunner": _portable, "flinkrunner": _flink, "sparkrunner": _spark}.get(runner.lower())
    if checks is None:
        return
    problems = _parallelism(options) + checks(options)
    if problems:
        raise RunnerConfigError(f"--runner={runner} cannot run as configured:\n  - " + "\n  - ".join(problems))


def _portable(options) -> list[str]:
    from apache_beam.options.pipeline_options import PortableOptions

    endpoint = options.view_as(PortableOptions).job_endpoint
    if not endpoint:
        return [
            "no --job_endpoint: pass --job_endpoint=HOST:PORT of a running Beam job service "
            "(or use --runner portable-local to start one on this machine)"
        ]
    if endpoint == "embed":  # PortableRunner starts an in-process job service
        return []
    return _unreachable("--job_endpoint", endpoint, None, "pass the HOST:PORT a Beam job service listens on")


def _flink(options) -> list[str]:
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, JobServerOptions, PortableOptions

    flink = options.view_as(FlinkRunnerOptions)
    endpoint = options.view_as(PortableOptions).job_endpoint
    if endpoint:
        return _unreachable("--job_endpoint", endpoint, None, "pass the HOST:PORT a Flink job server listens on")
    problems = []
    if flink.flink_master.strip() not in FLINK_EMBEDDED_MASTERS:
        problems += _unreachable(
            "--flink_master",
            flink.flink_master,
            8081,
            "pass the Flink JobManager's REST address (--flink_master=HOST:8081), "
            "or --flink_master=[local] to run Flink inside the job server",
        )
    problems += _jar(
        "--flink_job_server_jar",
        flink.flink_job_server_jar,
        f":runners:flink:{flink.flink_version}:job-server:shadowJar",
        options.view_as(JobServerOptions).jar_cache_dir,
        "Flink",
    )
    if not flink.flink_submit_uber_jar:  # an uber jar is built in Python and uploaded; no job server runs
        problems += _java("Flink")
    return problems


def _spark(options) -> list[str]:
    from apache_beam.options.pipeline_options import JobServerOptions, PortableOptions, SparkRunnerOptions

    spark = options.view_as(SparkRunnerOptions)
    endpoint = options.view_as(PortableOptions).job_endpoint
    if endpoint:
        return _unreachable("--job_endpoint", endpoint, None, "pass the HOST:PORT a Spark job server listens on")
    problems = []
    if spark.spark_submit_uber_jar:
        if not spark.spark_rest_url:
            problems.append("--spark_submit_uber_jar needs --spark_rest_url=http://HOST:6066 (the Spark REST server)")
        else:
            problems += _unreachable("--spark_rest_url", spark.spark_rest_url, 6066, "pass the Spark REST server's URL")
    else:
        if not SPARK_LOCAL_MASTER.match(spark.spark_master_url):
            problems += _unreachable(
                "--spark_master_url",
                spark.spark_master_url,
                7077,
                "pass a running Spark master (--spark_master_url=spark://HOST:7077), "
                "or --spark_master_url=local[N] to run Spark inside the job server",
            )
        problems += _java("Spark")
    problems += _jar(
        "--spark_job_server_jar",
        spark.spark_job_server_jar,
        ":runners:spark:3:job-server:shadowJar",
        options.view_as(JobServerOptions).jar_cache_dir,
        "Spark",
    )
    return problems


def _parallelism(options) -> list[str]:
    from apache_beam.options.pipeline_options import PortableOptions

    value = options.view_as(PortableOptions).sdk_worker_parallelism
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        return [f"--sdk_worker_parallelism={value}: expected a whole number of SDK workers (0: the runner chooses)"]
    return []


def host_port(address: str, default_port: int | None) -> tuple[str, int]:
    """Host and port of `host:port`, `scheme://host[:port][/path]` or `dns:///host:port`; ValueError if none."""
    text = address.strip()
    if text.startswith("dns:///"):
        text = text[len("dns:///") :]
    parts = urlsplit(text if "://" in text else "//" + text)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme) or default_port
    if not parts.hostname or port is None:
        raise ValueError(f"{address!r}: expected HOST:PORT")
    return parts.hostname, port


def _unreachable(option: str, address: str, default_port: int | None, fix: str) -> list[str]:
    """[] if something accepts a TCP connection at the option's address, else the problem and the fix."""
    try:
        host, port = host_port(address, default_port)
    except ValueError as e:
        return [f"{option}={address}: {e}; {fix}"]
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        return [f"{option}={address}: nothing accepts connections at {host}:{port} ({reason}); {fix}"]
    return []


def _jar(option: str, given: str | None, gradle_target: str, cache_dir: str | None, runner: str) -> list[str]:
    """[] if the job server jar Beam will start is usable: the given file or URL, or Beam's default."""
    from apache_beam.utils.subprocess_server import JavaJarServer

    fix = (
        f"pass {option}=/path/to/the/jar (Beam's {runner} job server, e.g. "
        f"{os.path.basename(JavaJarServer.path_to_beam_jar(gradle_target))}), "
        f"or --job_endpoint=HOST:PORT of a {runner} job server already running"
    )
    if given:
        if given.startswith(("http://", "https://")):
            reason = _download_problem(given)
            return [f"{option}={given}: cannot be downloaded ({reason}); {fix}"] if reason else []
        if not os.path.isfile(given):
            return [f"{option}={given}: no such file; {fix}"]
        if not zipfile.is_zipfile(given):
            return [f"{option}={given}: not a jar (zip) file; {fix}"]
        return []
    url = JavaJarServer.path_to_beam_jar(gradle_target)
    if os.path.isfile(url):  # a jar built in a Beam source tree
        return []
    cached = os.path.join(cache_dir or JavaJarServer.JAR_CACHE, os.path.basename(url))
    if os.path.isfile(cached):
        return []
    reason = _download_problem(url)
    if reason and url.startswith(JavaJarServer.MAVEN_CENTRAL_REPOSITORY):  # Beam falls back to Google's mirror
        mirror = url.replace(JavaJarServer.MAVEN_CENTRAL_REPOSITORY, JavaJarServer.GOOGLE_MAVEN_MIRROR)
        mirror_reason = _download_problem(mirror)
        reason = f"{reason}; its mirror {mirror}: {mirror_reason}" if mirror_reason else None
    if reason:
        return [
            f"no {option}: Beam would download {url} and cannot ({reason}); not in Beam's cache {cached} either; {fix}"
        ]
    return []


def _download_problem(url: str) -> str | None:
    """None if `url` answers a HEAD request, else why not."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_CHECK_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def _java(runner: str) -> list[str]:
    if shutil.which("java"):
        return []
    return [
        f"Beam starts the {runner} job server with Java and `java` is not on PATH: install a Java runtime (11+), "
        f"or pass --job_endpoint=HOST:PORT of a {runner} job server already running"
    ]
