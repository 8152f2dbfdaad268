"""portable-local's SDK workers: more than one process, none sharing the driver's disk, fed through S3.

Each probe job runs on Beam's job service and SDK worker pool (runners/local_services.py) and writes
what every element saw on its worker to S3, where the driver reads it back: the driver's disk is no
channel. The same probe with isolation off sees the driver's files, so the isolated run's "cannot
see" is the isolation's doing, not the probe's blindness.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest

from beam_pipeline import remote_fs
from runners import isolation
from tests.conftest import ROOT, TAXI_CSV

ELEMENTS = 40
PACKAGE_FILE = os.path.join(ROOT, "beam_pipeline", "__init__.py")
TESTS_FILE = os.path.join(ROOT, "tests", "conftest.py")


def _probe_on_workers(bucket: str, driver_files: dict[str, str], write_dir: str, isolate: bool) -> list[dict]:
    """Run the probe on portable-local's SDK workers; one record per element, read back from S3."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from runners.options import local_portable_services

    def probe(element: int) -> str:
        # Defined here so cloudpickle ships it by value: a worker cannot import this test module.
        import os
        import sys

        wrote, write_error = os.path.join(write_dir, f"from-worker-{os.getpid()}.txt"), None
        try:
            os.makedirs(write_dir, exist_ok=True)
            with open(wrote, "w") as f:
                f.write("written on a worker")
        except OSError as e:
            write_error = e.strerror
        return json.dumps(
            {
                "element": element,
                "pid": os.getpid(),
                "argv0": sys.argv[0],
                "cwd": os.getcwd(),
                "sees": {name: os.path.exists(path) for name, path in driver_files.items()},
                "wrote": wrote,
                "write_error": write_error,
            }
        )

    out = f"{bucket}/probe-{'isolated' if isolate else 'shared'}/part"
    with local_portable_services(isolate=isolate) as args:
        options = PipelineOptions(args + remote_fs.enable_for([bucket], args))
        with beam.Pipeline(options=options) as p:
            _ = (
                p
                | beam.Create(range(ELEMENTS))
                | beam.Reshuffle()  # the runner partitions a stage's input over its workers
                | beam.Map(probe)
                | beam.io.WriteToText(out)
            )
    records = []
    for match in FileSystems.match([out + "*"])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            records += [json.loads(line) for line in f.read().decode().splitlines()]
    return records


@pytest.fixture(scope="module")
def driver_files(tmp_path_factory) -> dict[str, str]:
    """Files only the driver has: in its tmp dir, /dev/shm, /var/tmp, the checkout's examples/ and tests/."""
    tmp = tmp_path_factory.mktemp("driver_only")
    secret = tmp / "secret.txt"
    secret.write_text("the driver's")
    scratch = [f"{d}/beam-driver-only-{os.getpid()}" for d in ("/dev/shm", "/var/tmp")]
    for path in scratch:
        with open(path, "w") as f:
            f.write("the driver's")
    yield {
        "driver_tmp": str(secret),
        "dev_shm": scratch[0],
        "var_tmp": scratch[1],
        "examples": TAXI_CSV,
        "tests": TESTS_FILE,
        "package": PACKAGE_FILE,
    }
    for path in scratch:
        os.unlink(path)


@pytest.fixture(scope="module")
def isolated(s3_server, driver_files, tmp_path_factory) -> tuple[list[dict], str]:
    write_dir = str(tmp_path_factory.mktemp("worker_writes"))
    return _probe_on_workers(s3_server.new_bucket(), driver_files, write_dir, isolate=True), write_dir


def test_work_is_spread_over_more_than_one_sdk_worker_process(isolated):
    records, _ = isolated
    assert sorted(r["element"] for r in records) == list(range(ELEMENTS))
    pids = {r["pid"] for r in records}
    assert len(pids) >= 2, f"every element ran in one process: {pids}"
    assert os.getpid() not in pids
    assert all(r["argv0"].endswith("sdk_worker_main.py") for r in records), {r["argv0"] for r in records}


def test_a_worker_sees_none_of_the_driver_files_but_its_packages(isolated, driver_files):
    records, _ = isolated
    assert all(os.path.exists(path) for path in driver_files.values())  # the driver has them all
    for r in records:
        assert r["sees"] == dict.fromkeys(driver_files, False) | {"package": True}
        assert r["cwd"] != os.getcwd() and r["cwd"].startswith("/tmp/sdk-worker-"), r["cwd"]


def test_what_a_worker_writes_to_a_driver_path_never_reaches_the_driver(isolated):
    records, write_dir = isolated
    assert all(r["write_error"] is None for r in records)  # it wrote into its own private /tmp
    assert os.listdir(write_dir) == []
    assert not any(os.path.exists(r["wrote"]) for r in records)


def test_without_isolation_the_same_probe_sees_the_driver_files(s3_bucket, driver_files, tmp_path):
    records = _probe_on_workers(s3_bucket, driver_files, str(tmp_path / "writes"), isolate=False)
    assert len({r["pid"] for r in records}) >= 2
    assert all(all(r["sees"].values()) for r in records), [r["sees"] for r in records]
    assert {os.path.basename(r["wrote"]) for r in records} == set(os.listdir(tmp_path / "writes"))


def test_the_checkout_is_hidden_around_the_interpreter_and_the_packages():
    # private=(): what covers the checkout wherever it is (under /tmp the private /tmp hides it whole).
    hidden = isolation.paths_to_hide(isolation.keep_paths(), ROOT, ROOT, private=())
    assert os.path.join(ROOT, "examples") in hidden and os.path.join(ROOT, "tests") in hidden
    for needed in (os.path.join(ROOT, name) for name in isolation.PACKAGES):
        assert not any(needed == h or needed.startswith(h + "/") for h in hidden), needed
    assert not any(sys.prefix == h or sys.prefix.startswith(h + "/") for h in hidden), (sys.prefix, hidden)


def test_paths_to_hide_covers_directories_around_what_is_kept(tmp_path):
    checkout = tmp_path / "checkout"
    for d in ("venv/lib", "pkg", "examples/data", "deep/keep_me", "deep/other"):
        (checkout / d).mkdir(parents=True)
    (checkout / "README.md").write_text("a file stays")
    (checkout / "link").symlink_to(tmp_path)  # a mount over a symlink would land on its target
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    keep = [str(checkout / "venv"), str(checkout / "pkg"), str(checkout / "deep" / "keep_me")]
    hidden = isolation.paths_to_hide(keep, str(cwd), str(checkout), private=())
    assert hidden == sorted([str(checkout / "examples"), str(checkout / "deep" / "other"), str(cwd)])
    # Under the private /tmp, nothing needs covering: the private /tmp hides it all.
    assert isolation.paths_to_hide(keep, str(cwd), str(checkout), private=(str(tmp_path),)) == []
    # System directories are never covered, whatever the working directory.
    assert isolation.paths_to_hide(keep, "/usr/lib", str(checkout), private=()) == hidden[:-1]


def test_kept_directories_under_the_private_tmp_are_shown_again_to_workers_too(tmp_path):
    """A venv or checkout under /tmp: the private /tmp would hide the interpreter the workers need."""
    import subprocess

    from tests.helpers import require

    unshare, reason = isolation.probe()
    require(unshare, f"a private mount namespace ({reason})")
    keep, drop = tmp_path / "venv", tmp_path / "checkout-data"
    (keep / "lib").mkdir(parents=True)
    (keep / "lib" / "module.py").write_text("kept")
    drop.mkdir()
    (drop / "secret").write_text("hidden")
    rebind = isolation.rebinds([str(keep), str(keep / "lib"), "/usr/lib"], private=[str(tmp_path.parent)])
    assert rebind == [str(keep)], "only what is under a private directory, outermost only"
    outer = isolation.Isolation(tuple(unshare), rebind=tuple(rebind))
    look = ["sh", "-c", f"cat {keep}/lib/module.py; echo; test ! -e {drop}/secret && echo dropped"]
    for command in (outer.command(look, "w"), outer.command(outer.nested().command(look, "w2"), "w1")):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout.split()) == (0, ["kept", "dropped"]), done.stderr
    with pytest.raises(isolation.IsolationError, match="at most 7 can be shown"):
        isolation.Isolation(tuple(unshare), rebind=tuple(f"/tmp/d{i}" for i in range(8)))


def test_isolation_that_cannot_be_had_fails_in_ci_and_warns_elsewhere(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare on it
    monkeypatch.delenv(isolation.ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(isolation.IsolationError, match=rf"`unshare`.*{isolation.ENV}=0"):
        isolation.decide()
    monkeypatch.setenv("CI", "false")
    with caplog.at_level(logging.WARNING, logger="runners.isolation"):
        assert isolation.decide() is None
    assert "NOT isolated" in caplog.text and "unshare" in caplog.text
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv(isolation.ENV, "0")  # asked not to isolate: nothing to fail
    assert isolation.decide() is None


@pytest.mark.slow
def test_example_gen_and_statistics_gen_on_isolated_workers_with_the_root_on_s3(s3_server, taxi_small_csv, tmp_path):
    """The data half on two isolated workers: input and root on S3, ML Metadata on the driver's disk."""
    from beam_pipeline import Pipeline, launcher
    from runners.options import local_portable_services
    from transforms.example_gen import ExampleGen
    from transforms.statistics_gen import StatisticsGen

    bucket = s3_server.new_bucket()
    s3_server.client().upload_file(taxi_small_csv, bucket[5:], "data/data.csv")
    gen = ExampleGen(input_base=f"{bucket}/data/data.csv")
    stats = StatisticsGen(examples=gen.outputs.examples)
    pipeline = Pipeline("isolated", f"{bucket}/root", [gen, stats])
    with local_portable_services() as args:
        result = launcher.run(
            pipeline, args + remote_fs.enable_for([bucket], args), metadata_uri=str(tmp_path / "metadata.sqlite")
        )
    assert {c.id: c.state for c in result.components.values()} == {
        "ExampleGen": "COMPLETE",
        "StatisticsGen": "COMPLETE",
    }
    assert sum(result.artifact("ExampleGen", "examples").properties["row_counts"].values()) == 1500
    statistics = result.artifact("StatisticsGen", "statistics")
    assert statistics.uri.startswith(f"{bucket}/root/")
    from beam_pipeline import queries

    assert set(queries.read_statistics(statistics)) == {"train", "eval"}


def test_local_paths_the_isolated_workers_would_read_are_refused_before_anything_runs(tmp_path, taxi_small_csv):
    from beam_pipeline import Pipeline, launcher
    from beam_pipeline.errors import PipelineDefinitionError
    from runners.options import NO_SHARED_DISK
    from transforms.example_gen import ExampleGen

    args = [f"--experiments={NO_SHARED_DISK}"]
    root = tmp_path / "root"
    with pytest.raises(PipelineDefinitionError) as refused:
        launcher.run(Pipeline("local", str(root), [ExampleGen(input_base=taxi_small_csv)]), args)
    message = str(refused.value)
    assert f"pipeline root {root}" in message and f"ExampleGen.input_base {taxi_small_csv}" in message
    assert "s3://" in message and isolation.ENV in message
    assert not root.exists()  # refused before the launcher created anything


def test_an_input_a_worker_cannot_see_is_named_in_the_error(tmp_path):
    from beam_pipeline.errors import InputDataError
    from transforms._input_files import file_size

    missing = str(tmp_path / "on-the-driver-only.csv")
    with pytest.raises(InputDataError, match=r"on-the-driver-only\.csv is not visible on .*s3://"):
        file_size(missing)
