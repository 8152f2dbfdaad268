"""The store layer retries what a retry can cure, and never turns an error into an empty answer."""

from __future__ import annotations

import pytest
from ml_metadata import errors as mlmd_errors
from ml_metadata.metadata_store import metadata_store

from beam_pipeline import metadata
from beam_pipeline.errors import MetadataError
from beam_pipeline.metadata import MetadataStore


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(metadata.time, "sleep", lambda s: None)


class _Failing:
    """Wraps the real MLMD store; its named method fails with `errors` in turn, then works."""

    def __init__(self, real, method: str, errors: list[Exception]):
        self._real, self._method, self._errors, self.calls = real, method, list(errors), 0

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name != self._method:
            return attr

        def call(*args, **kwargs):
            self.calls += 1
            if self._errors:
                raise self._errors.pop(0)
            return attr(*args, **kwargs)

        return call


def _store(tmp_path, method: str, errors: list[Exception]) -> tuple[MetadataStore, _Failing]:
    store = MetadataStore(str(tmp_path / "m.sqlite"))
    store.run_contexts("p", "r1")
    failing = _Failing(store._store, method, errors)
    store._store = failing
    return store, failing


def test_a_transient_read_error_is_retried(tmp_path):
    store, failing = _store(tmp_path, "get_artifacts_by_type", [mlmd_errors.UnavailableError("server gone away")] * 2)
    assert store.latest_artifacts("Model", "p") == []
    assert failing.calls == 3


def test_a_read_error_that_persists_fails_after_a_bounded_number_of_tries(tmp_path):
    store, failing = _store(tmp_path, "get_artifacts_by_type", [mlmd_errors.UnavailableError("down")] * 50)
    with pytest.raises(MetadataError, match=r"reading Model artifacts failed after 5 attempts: down"):
        store.latest_artifacts("Model", "p")
    assert failing.calls == 5


def test_a_non_transient_error_is_an_error_not_no_baseline(tmp_path):
    """A store error while looking up the baseline must fail the run, never read as "no baseline"."""
    store, failing = _store(tmp_path, "get_artifacts_by_type", [mlmd_errors.PermissionDeniedError("no grant")])
    with pytest.raises(MetadataError, match="no grant"):
        store.latest_artifacts("ModelBlessing", "p")
    assert failing.calls == 1


def test_a_cache_lookup_error_is_an_error_not_a_miss(tmp_path):
    store, _ = _store(tmp_path, "get_executions_by_type", [mlmd_errors.InternalError("table locked")])
    with pytest.raises(MetadataError, match="table locked"):
        store.cached_outputs("key", "Trainer")


def test_a_write_is_retried_after_a_deadlock_but_not_after_a_dropped_connection(tmp_path):
    store, failing = _store(tmp_path, "put_execution", [mlmd_errors.AbortedError("Deadlock found")])
    contexts = store.run_contexts("p", "r1")
    store.start_execution("T", "T", pipeline_name="p", run_id="r1", config={}, cache_key="", contexts=contexts)
    assert failing.calls == 2  # rolled back by the server: safe to apply again
    store, failing = _store(tmp_path, "put_execution", [mlmd_errors.UnavailableError("connection lost")])
    with pytest.raises(MetadataError, match="registering an execution failed: connection lost"):
        store.start_execution("T", "T", pipeline_name="p", run_id="r1", config={}, cache_key="", contexts=contexts)
    assert failing.calls == 1  # it may have landed: applying it twice would be worse


def test_opening_retries_the_empty_database_race_and_reports_other_errors(tmp_path, monkeypatch):
    real = metadata_store.MetadataStore
    failures = [RuntimeError("There are a subset of tables in MLMD instance. ... concurrent connection ...")] * 2

    def flaky(config, *args, **kwargs):
        if failures:
            raise failures.pop(0)
        return real(config, *args, **kwargs)

    monkeypatch.setattr(metadata_store, "MetadataStore", flaky)
    MetadataStore(str(tmp_path / "m.sqlite"))
    assert not failures
    monkeypatch.setattr(metadata_store, "MetadataStore", lambda config: (_ for _ in ()).throw(RuntimeError("bad")))
    with pytest.raises(MetadataError, match=r"cannot open ML Metadata store .*m2\.sqlite: bad"):
        MetadataStore(str(tmp_path / "m2.sqlite"))


def test_a_mysql_uri_takes_a_socket_or_a_host_never_both():
    """MLMD aborts the whole process when given both, so the URI parser must choose."""
    by_socket = metadata.connection_config("mysql://root@localhost/mlmd?socket=/run/mysqld/mysqld.sock")
    assert by_socket.mysql.socket == "/run/mysqld/mysqld.sock" and not by_socket.mysql.host
    by_host = metadata.connection_config("mysql://u:p%40ss@db.example:3307/mlmd")
    assert (by_host.mysql.host, by_host.mysql.port, by_host.mysql.password) == ("db.example", 3307, "p@ss")
    assert not by_host.mysql.socket
