"""Shared fixtures: the repo's copy of the taxi sample, small slices of it, and temporary pipeline roots."""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Input digests and type scans are memoized per machine (beam_pipeline/fingerprints.py): a suite's own.
os.environ.setdefault("BEAM_PIPELINE_CACHE_DIR", tempfile.mkdtemp(prefix="bp-test-cache-"))

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_CSV = os.path.join(ROOT, "examples", "chicago_taxi", "data", "data.csv")
PENGUIN_CSV = os.path.join(ROOT, "tests", "data", "penguins_processed.csv")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def taxi_csv() -> str:
    return TAXI_CSV


@pytest.fixture(scope="session")
def taxi_small_csv(tmp_path_factory) -> str:
    """The header and the first 1,500 rows of the taxi sample: enough for every column type."""
    path = tmp_path_factory.mktemp("taxi_small") / "data.csv"
    with open(TAXI_CSV) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            if i > 1500:
                break
            dst.write(line)
    return str(path)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> dict:
    """Two real runs of the example taxi pipeline and a cached re-run, built once per session (see
    tests/_fixtures_metadata.py); a test that changes one of its files restores it.
    """
    from tests import _fixtures_metadata

    return _fixtures_metadata.shared_model_store(str(tmp_path_factory.mktemp("model_store")))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback, its endpoint and credentials exported to this process and its children."""
    from tests import _s3
    from tests.helpers import require

    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError as e:
        require(False, f"the S3 tests need moto[server] and boto3 ({e})")
    yield from _s3.serve()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server: 's3://<name>'."""
    return s3_server.new_bucket()


_exit_status = [0]


def pytest_sessionfinish(session, exitstatus):
    _exit_status[0] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # tensorflow-io's S3 filesystem aborts the process at exit (remote_fs.exit_now): keep pytest's status.
    from beam_pipeline import remote_fs

    if remote_fs.used_s3():
        remote_fs.exit_now(_exit_status[0])
