"""ML Metadata on a real MariaDB server: two pipeline runs writing to one store at the same time lose nothing.

The fixture starts Debian's MariaDB on loopback with a private data directory and no grant tables,
so no system service or password is involved; it is skipped only when the server is not installed
or cannot start, and then fails instead when CI=true.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest

from beam_pipeline import queries, report
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.ports import free_port
from tests import _fixtures_metadata as fm
from tests.helpers import require

MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
STARTUP_ATTEMPTS = 120  # polls of 0.5 s for the server to accept connections


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    """A private MariaDB on 127.0.0.1:<free port>; yields the port and stops the server afterwards."""
    if MARIADBD is None or INSTALL_DB is None:
        require(False, "MariaDB server not installed (apt-get install mariadb-server)")
    base = tmp_path_factory.mktemp("mariadb")
    datadir, log = base / "data", base / "server.log"
    as_root = ["--user=root"] if os.geteuid() == 0 else []
    install = subprocess.run(
        [INSTALL_DB, "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
         "--skip-test-db", *as_root],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if install.returncode != 0:
        require(False, f"mariadb-install-db failed: {install.stderr[-500:]}")
    port = free_port()
    server = subprocess.Popen(
        [MARIADBD, "--no-defaults", f"--datadir={datadir}", f"--socket={base / 'mysqld.sock'}", f"--port={port}",
         "--bind-address=127.0.0.1", "--skip-grant-tables", "--skip-name-resolve", f"--log-error={log}",
         f"--pid-file={base / 'mysqld.pid'}", *as_root],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(STARTUP_ATTEMPTS):
            if server.poll() is not None or _accepts(port):
                break
            time.sleep(0.5)
        if server.poll() is not None or not _accepts(port):
            require(False, f"MariaDB did not start: {log.read_text()[-800:] if log.exists() else 'no log'}")
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_two_concurrent_runs_share_one_mysql_store(mariadb, tmp_path):
    uri = f"mysql://root@127.0.0.1:{mariadb}/beam_pipeline_concurrent"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "BEAM_PIPELINE_METADATA_URI": uri}
    runs = []
    for i, skip in enumerate((0, 6000)):
        data = fm.sample_csv(str(tmp_path / f"data{i}.csv"), rows=300, skip=skip)
        runs.append(fm.pipeline_file(str(tmp_path / f"pipeline{i}.py"), str(tmp_path / f"root{i}"), data))
    cli = [sys.executable, "-m", "beam_pipeline", "run"]
    processes = [
        subprocess.Popen([*cli, path, "--direct_num_workers=1"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for path in runs
    ]  # fmt: skip
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]

    store = MetadataStore(uri)
    table = queries.runs(store, "chicago_taxi")
    assert len(table) == 2
    assert list(table["state"]) == ["COMPLETE", "COMPLETE"] and list(table["components"]) == [4, 4]
    executions = [queries.run_executions(store, "chicago_taxi", run_id) for run_id in table["run_id"]]
    roots = set()
    for frame in executions:
        assert sorted(frame["component_id"]) == ["ExampleGen", "ExampleValidator", "SchemaGen", "StatisticsGen"]
        assert set(frame["state"]) == {"COMPLETE"}
        outputs_ids = [aid for outs in frame["outputs"] for aid in outs.values()]
        artifacts = store.get_artifacts(outputs_ids)
        assert len(artifacts) == 4
        for artifact in artifacts:
            assert os.path.isdir(artifact.uri), artifact.uri
        roots.add(os.path.commonpath([a.uri for a in artifacts]))
    assert roots == {str(tmp_path / "root0"), str(tmp_path / "root1")}
    assert len(store.mlmd.get_artifacts()) == 8 and len(store.mlmd.get_executions()) == 8

    # The report and the queries read a MySQL store like a SQLite one.
    path = report.write_run_report(uri, "chicago_taxi", table["run_id"].iloc[0], str(tmp_path / "report"))
    html = open(path).read()
    assert "ExampleValidator" in html and "Split train" in html
    assert queries.runs(uri)["duration_s"].notna().all()
