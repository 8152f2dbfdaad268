"""Fixtures: two versions of the demo SavedModel, built once, and fresh model base paths to serve them from."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from beam_pipeline.serving.testing import write_demo_model

V1_BIAS, V2_BIAS = 0.0, 1.0
ROW = {"trip_miles": 2.0, "trip_seconds": 300, "payment_type": "Cash"}


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Version number -> a complete SavedModel directory; tests copy them into their base paths."""
    root = tmp_path_factory.mktemp("model_store")
    return {1: write_demo_model(str(root / "v1"), V1_BIAS), 2: write_demo_model(str(root / "v2"), V2_BIAS)}


@pytest.fixture
def push(model_store: dict[int, str]) -> Callable[[str, int, int], str]:
    """push(base_path, version, as_version) copies a stored version in, as the Pusher does (temp dir + rename)."""

    def _push(base_path: str, version: int, as_version: int | None = None) -> str:
        target = os.path.join(base_path, str(as_version if as_version is not None else version))
        tmp = os.path.join(base_path, f".tmp-{os.path.basename(target)}")
        shutil.copytree(model_store[version], tmp)
        os.rename(tmp, target)
        return target

    return _push


@pytest.fixture
def base_path(tmp_path, push) -> str:
    """A model base path holding version 1 only."""
    path = str(tmp_path / "taxi")
    os.makedirs(path)
    push(path, 1)
    return path


@pytest.fixture
def client_factory(base_path: str) -> Iterator[Callable[..., object]]:
    """client_factory(**ServerConfig options) -> a started TestClient; every client is closed afterwards."""
    from starlette.testclient import TestClient

    from beam_pipeline.serving.server import create_app

    clients = []

    def make(path: str | None = None, raise_server_exceptions: bool = True, **options):
        options.setdefault("poll_interval_s", 0)
        options.setdefault("freeze_gc", False)  # each freeze costs a full collection: ~0.5 s per test
        app = create_app(path or base_path, "taxi", **options)
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
