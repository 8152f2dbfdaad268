"""Pusher onto S3 (moto on loopback) and `beam-pipeline serve` from it, with real trained taxi models.

The models are the session's `model_store` runs (two real taxi pipeline runs). What is checked: the
TF Serving layout with saved_model.pb written last, a push that fails or is killed mid-copy leaving
nothing a server loads, the compare-and-set without a lock (the store's conditional create decides
races; a push in progress is waited for), the cache fingerprint from listings, a whole pipeline
pushing to S3, and `serve` picking up a second push from S3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pytest
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import Pipeline, launcher, remote_fs
from beam_pipeline.errors import PipelineRunError
from beam_pipeline.metadata import MetadataStore
from beam_pipeline.serving.errors import ServableNotFoundError
from beam_pipeline.serving.models import ModelManager
from tests import _fixtures_metadata as fm
from tests.serving.serve_process import ROOT, serve_process, stop, wait_for
from transforms import _push_record as pr
from transforms import _push_store as ps
from transforms import push_model as pm
from transforms import pusher as pu
from transforms._push_record import TEMP_PREFIX

pytestmark = pytest.mark.slow

PB = pr.SAVED_MODEL_FILE
WAIT_S = 600  # a bound on waits for another thread, not a timing assertion


@pytest.fixture(scope="module")
def models(model_store) -> dict[str, str]:
    """'a' and 'b': the SavedModel directories (Format-Serving) of the two real runs' Trainers."""
    store = MetadataStore(model_store["store"])
    a, b = store.get_artifacts([model_store["a"]["model"], model_store["b"]["model"]])
    return {"a": os.path.join(a.uri, pu.SERVING_MODEL_DIR), "b": os.path.join(b.uri, pu.SERVING_MODEL_DIR)}


@pytest.fixture
def base(s3_bucket) -> str:
    remote_fs.enable_for([s3_bucket])
    return f"{s3_bucket}/models/taxi"


def _record(model_dir: str) -> dict:
    return {"model_uri": os.path.dirname(model_dir), "pushed_by": "test"}


def _keys(s3_server, uri: str) -> dict[str, bytes]:
    """Relative key -> bytes of every object under `uri`, read with boto3 (not through the code under test)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client, out = s3_server.client(), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1 :]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _tree(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), path)] = f.read()
    return out


def _versions(s3_server, base: str) -> dict[str, set[str]]:
    """Top-level name -> the relative paths under it."""
    out: dict[str, set[str]] = {}
    for key in _keys(s3_server, base):
        top, _, rest = key.partition("/")
        out.setdefault(top, set()).add(rest)
    return out


def test_push_to_s3_writes_the_tf_serving_layout_with_saved_model_pb_last(models, base, s3_server, monkeypatch):
    real_copy, real_claim = FileSystems.copy, ps._create_exclusive
    writes: list[str] = []  # what was written under version 1, in order
    at_pb: list[set[str]] = []  # the version's objects at the moment saved_model.pb is copied

    def claim(path, data):
        writes.append(path)
        return real_claim(path, data)

    def copy(sources, destinations):
        if any(d.endswith("/1/" + PB) for d in destinations):
            at_pb.append(set(_keys(s3_server, f"{base}/1")))
        writes.extend(destinations)
        return real_copy(sources, destinations)

    monkeypatch.setattr(ps, "_create_exclusive", claim)
    monkeypatch.setattr(FileSystems, "copy", copy)
    assert pm.push_model(models["a"], base, record=_record(models["a"])) == (1, f"{base}/1")

    served = _keys(s3_server, f"{base}/1")
    record = json.loads(served.pop(pr.PUSH_RECORD))
    source = _tree(models["a"])
    assert served == source  # the whole SavedModel, byte for byte, variables and assets included
    assert any(k.startswith("variables/") for k in source) and any(k.startswith("assets/") for k in source)
    assert record["model_uri"] == os.path.dirname(models["a"]) and record["pushed_by"] == "test"
    assert writes[0] == f"{base}/1/{pr.PUSH_RECORD}"  # the claim comes first
    assert writes[-1] == f"{base}/1/{PB}"
    assert at_pb == [set(source) - {PB} | {pr.PUSH_RECORD}]  # everything else was in place before it
    assert set(_versions(s3_server, base)) == {"1"}  # the upload prefix is gone


def test_a_push_that_fails_mid_copy_leaves_nothing_a_server_loads(models, base, s3_server, monkeypatch):
    real_copy = FileSystems.copy
    seen_mid_push: list[set[str]] = []

    def copy_three_then_fail(sources, destinations):
        if destinations[0].startswith(f"{base}/1/"):
            real_copy(sources[:3], destinations[:3])
            seen_mid_push.append(set(_keys(s3_server, f"{base}/1")))
            raise BeamIOError("copy failed", {"simulated": "connection reset"})
        return real_copy(sources, destinations)

    monkeypatch.setattr(FileSystems, "copy", copy_three_then_fail)
    with pytest.raises(PipelineRunError, match=r"failed: BeamIOError"):
        pm.push_model(models["a"], base, record=_record(models["a"]))
    assert len(seen_mid_push[0]) == 4 and PB not in seen_mid_push[0]  # the claim and three objects
    assert _versions(s3_server, base) == {}  # the failed push removed its claim, objects and upload

    manager = ModelManager(base, "taxi")
    manager.poll_once()
    with pytest.raises(ServableNotFoundError):
        manager.status()
    monkeypatch.setattr(FileSystems, "copy", real_copy)
    assert pm.push_model(models["a"], base, record=_record(models["a"]))[0] == 1
    manager.poll_once()
    with manager.acquire() as servable:
        assert servable.version == 1
    manager.stop()


_KILLED_PUSH = """
import os, sys
sys.path.insert(0, {root!r})
from apache_beam.io.filesystems import FileSystems
from beam_pipeline import remote_fs
from transforms import pusher as pu
from transforms import push_model as pm
from transforms import _push_record as pr

remote_fs.enable_for([{base!r}])
real_copy = FileSystems.copy

def copy_three_then_die(sources, destinations):
    if destinations[0].startswith({base!r} + "/1/"):
        real_copy(sources[:3], destinations[:3])
        os._exit(9)  # as kill -9: no cleanup runs
    return real_copy(sources, destinations)

FileSystems.copy = copy_three_then_die
pm.push_model({model!r}, {base!r}, record={{"model_uri": "killed", "pushed_by": "the killed push"}})
"""


def test_a_push_killed_mid_copy_is_waited_for_then_passed_over_and_removed(models, base, s3_server):
    script = _KILLED_PUSH.format(root=ROOT, base=base, model=models["a"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 9, done.stderr[-3000:]
    left = _versions(s3_server, base)
    assert PB not in left["1"] and pr.PUSH_RECORD in left["1"] and len(left["1"]) == 4
    assert [n for n in left if n.startswith(TEMP_PREFIX)]  # its upload, too

    manager = ModelManager(base, "taxi")
    manager.poll_once()
    assert [(s["version"], s["state"], s["status"]["error_code"]) for s in manager.status()] == [
        ("1", "END", "NOT_FOUND")
    ]  # listed as TF Serving lists a version it cannot load, never served

    # Within STALE_AFTER_S it may be a slow push in progress: the next push waits for it, and says for whom.
    with pytest.raises(PipelineRunError, match=r"waited 1 s for the push of version 1 \(by the killed push\)"):
        pm.push_model(models["b"], base, record=_record(models["b"]), lock_timeout_s=1)
    # Past it (here: at once) it is abandoned: the next push takes version 2, then removes what it left.
    guard = pr.Guard(os.path.dirname(models["b"]), None, frozenset())  # only "nothing is served yet" passes
    assert pm.push_model(models["b"], base, record=_record(models["b"]), guard=guard, stale_after_s=0)[0] == 2
    assert set(_versions(s3_server, base)) == {"2"}
    manager.poll_once()
    with manager.acquire() as servable:
        assert servable.version == 2
    manager.stop()


def _stale_listing_until_the_first_claim(monkeypatch, stale: ps._StoreListing) -> None:
    """Listings taken before this push's first claim miss another push's version that landed meanwhile."""
    real_list, real_claim = ps._list_store, ps._create_exclusive
    claimed: list[str] = []
    monkeypatch.setattr(ps, "_list_store", lambda base: real_list(base) if claimed else stale)
    monkeypatch.setattr(ps, "_create_exclusive", lambda path, data: claimed.append(path) or real_claim(path, data))


def test_racing_pushes_the_store_gives_the_version_to_one_and_the_other_rechecks(models, base, s3_server, monkeypatch):
    a, b = os.path.dirname(models["a"]), os.path.dirname(models["b"])
    assert pm.push_model(models["a"], base, record=_record(models["a"]))[0] == 1  # the racer's push landed
    before = _keys(s3_server, f"{base}/1")

    # Judged against nothing, it listed before version 1 landed: the claim of 1 fails, the recheck refuses.
    _stale_listing_until_the_first_claim(monkeypatch, ps._StoreListing({}, {}))
    with pytest.raises(pr.PushRefused, match=r"version 1 \(model .*, pushed by test\) won"):
        pm.push_model(models["b"], base, record=_record(models["b"]), guard=pr.Guard(b, None, frozenset()))
    assert set(_versions(s3_server, base)) == {"1"} and _keys(s3_server, f"{base}/1") == before

    # Judged against the racer's model: the claim of 1 fails, it takes 2.
    monkeypatch.undo()
    _stale_listing_until_the_first_claim(monkeypatch, ps._StoreListing({}, {}))
    guard = pr.Guard(b, a, frozenset({a}))
    assert pm.push_model(models["b"], base, record=_record(models["b"]), guard=guard) == (2, f"{base}/2")
    assert _keys(s3_server, f"{base}/1") == before  # the other push is untouched
    assert pr.read_push_record(f"{base}/2")["model_uri"] == b


def test_a_push_in_progress_is_waited_for_and_checked_against(models, base, s3_server, monkeypatch):
    a, b = os.path.dirname(models["a"]), os.path.dirname(models["b"])
    real_copy, real_list = FileSystems.copy, ps._list_store
    at_pb, release = threading.Event(), threading.Event()
    second_listed_pending = threading.Event()
    lists_by_second: list[int] = []

    def copy(sources, destinations):
        if destinations == [f"{base}/1/{PB}"]:
            at_pb.set()  # the first push has all but its saved_model.pb in place
            assert release.wait(WAIT_S)
        return real_copy(sources, destinations)

    def listing(path):
        found = real_list(path)
        if threading.current_thread().name == "second" and 1 in found.versions and not found.versions[1].complete:
            lists_by_second.append(1)
            if len(lists_by_second) >= 2:
                second_listed_pending.set()
        return found

    monkeypatch.setattr(FileSystems, "copy", copy)
    monkeypatch.setattr(ps, "_list_store", listing)
    results: dict[str, object] = {}

    def push(name, model_dir, guard):
        try:
            results[name] = pm.push_model(model_dir, base, record=_record(model_dir), guard=guard)
        except (pr.PushRefused, PipelineRunError) as e:
            results[name] = e

    first = threading.Thread(target=push, args=("first", models["a"], None), name="first")
    first.start()
    assert at_pb.wait(WAIT_S)
    second = threading.Thread(target=push, args=("second", models["b"], pr.Guard(b, a, frozenset({a}))), name="second")
    second.start()
    assert second_listed_pending.wait(WAIT_S)  # it saw version 1 in progress twice, and waits
    assert {n for n in _versions(s3_server, base) if not n.startswith(".")} == {"1"}  # no version 2 yet
    release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert results == {"first": (1, f"{base}/1"), "second": (2, f"{base}/2")}
    assert pr.read_push_record(f"{base}/1")["model_uri"] == a and pr.read_push_record(f"{base}/2")["model_uri"] == b


def test_cache_fingerprint_comes_from_the_listing_and_counts_complete_versions(
    models, base, s3_server, monkeypatch, tmp_path
):
    data = fm.sample_csv(str(tmp_path / "data.csv"), rows=50)
    pusher = _lenient_pipeline(str(tmp_path), base, data).components[-1]
    empty = pusher.external_fingerprint()
    pm.push_model(models["a"], base, record=_record(models["a"]))
    one = pusher.external_fingerprint()
    assert one != empty
    bucket, _, prefix = base.removeprefix("s3://").partition("/")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/2/variables/variables.index", Body=b"partial")

    def no_downloads(*args, **kwargs):
        raise AssertionError(f"the fingerprint downloaded {args[0]}")

    monkeypatch.setattr(FileSystems, "open", no_downloads)
    assert pusher.external_fingerprint() == one  # a version without saved_model.pb does not count


def _lenient_pipeline(base_dir: str, serving_model_dir: str, data: str) -> Pipeline:
    """ExampleGen through Trainer on `data`, an always-blessing Evaluator and a Pusher to `serving_model_dir`."""
    from tests.test_pusher import GOOD, _components
    from transforms.evaluator import Evaluator, binary_classification_eval_config

    c = _components(data, GOOD)
    evaluator = Evaluator(
        examples=c["examples"],
        model=c["model"],
        eval_config=binary_classification_eval_config("tips_xf", lower_bounds={"example_count": 1}),
    )
    pusher = pu.Pusher(model=c["model"], blessing=evaluator.outputs.blessing, serving_model_dir=serving_model_dir)
    return Pipeline("push_to_s3", os.path.join(base_dir, "root"), [*c["upstream"], evaluator, pusher])


def test_pipeline_pushes_to_s3_and_a_rerun_is_cached(base, s3_server, tmp_path):
    data = fm.sample_csv(str(tmp_path / "data.csv"), rows=400)
    first = launcher.run(_lenient_pipeline(str(tmp_path), base, data), fm.BEAM_ARGS)
    pushed = first.artifact("Pusher", "pushed_model").properties
    assert (pushed["pushed"], pushed["pushed_version"], pushed["pushed_destination"]) == (1, 1, f"{base}/1")
    model = first.artifact("Trainer", "model").uri
    served = _keys(s3_server, f"{base}/1")
    assert json.loads(served.pop(pr.PUSH_RECORD))["pushed_by"] == f"push_to_s3 run {first.run_id}"
    assert served == _tree(os.path.join(model, pu.SERVING_MODEL_DIR))

    again = launcher.run(_lenient_pipeline(str(tmp_path), base, data), fm.BEAM_ARGS)
    assert again.components["Pusher"].state == "CACHED"  # the versions are as the first push left them
    assert set(_versions(s3_server, base)) == {"1"}


# -- serving from S3 ---------------------------------------------------------------------------------------
def _rows(model_dir: str, n: int = 8) -> tuple[list[dict], np.ndarray]:
    """`n` CSV rows with every float present, as :predict instances, and the SavedModel's own scores on them."""
    import tensorflow as tf

    fn = tf.saved_model.load(model_dir).signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    arrow = {tf.float32: pa.float32(), tf.int64: pa.int64(), tf.string: pa.string()}
    options = pcsv.ConvertOptions(
        column_types={k: arrow[s.dtype] for k, s in specs.items()}, include_columns=list(specs)
    )
    table = pcsv.read_csv(fm.TAXI_CSV, convert_options=options).slice(0, 2000)
    floats = [name for name, spec in specs.items() if spec.dtype == tf.float32]
    present = np.all([pc.is_valid(table[f]).to_pylist() for f in floats], axis=0)
    table = table.filter(pa.array(present))
    assert table.num_rows >= n
    table = table.slice(0, n)
    columns = {
        name: pc.fill_null(table[name], -1 if spec.dtype == tf.int64 else "").to_pylist()
        if spec.dtype != tf.float32
        else table[name].to_pylist()
        for name, spec in specs.items()
    }
    instances = [{name: values[i] for name, values in columns.items()} for i in range(n)]
    scores = fn(**{name: tf.constant(columns[name], dtype=spec.dtype) for name, spec in specs.items()})["scores"]
    return instances, scores.numpy()


def _state(response: httpx.Response) -> str | None:
    return response.json()["model_version_status"][0]["state"] if response.status_code == 200 else None


def test_serve_from_s3_answers_for_version_1_then_takes_up_version_2(models, base, tmp_path):
    pm.push_model(models["a"], base, record=_record(models["a"]))
    instances, expected_a = _rows(models["a"])
    _, expected_b = _rows(models["b"])
    assert not np.allclose(expected_a, expected_b)
    log = tmp_path / "serve.log"
    with serve_process(base, log, "--poll_interval_s", "0.2") as (proc, url), httpx.Client(timeout=120) as client:
        wait_for(lambda: _state(client.get(f"{url}/versions/1")) == "AVAILABLE", "version 1 is loaded", proc)
        r = client.post(f"{url}:predict", json={"instances": instances})
        assert r.status_code == 200, r.text
        assert np.allclose(np.array(r.json()["predictions"]), expected_a)

        assert pm.push_model(models["b"], base, record=_record(models["b"]))[0] == 2
        wait_for(lambda: _state(client.get(f"{url}/versions/2")) == "AVAILABLE", "version 2 is loaded", proc)
        r = client.post(f"{url}:predict", json={"instances": instances})
        assert r.status_code == 200, r.text
        assert np.allclose(np.array(r.json()["predictions"]), expected_b)
        code = stop(proc, signal.SIGINT, log)
    assert code == 0, log.read_text()[-3000:]  # not 134: it left through remote_fs.exit_now
