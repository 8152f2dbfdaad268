"""Shared fixtures: the repo's copy of the taxi sample, small slices of it, and temporary pipeline roots."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
