"""Caching by content fingerprints and resume after a failure, on the data half of the taxi pipeline."""

from __future__ import annotations

import os
import shutil

import apache_beam as beam
import pytest

from beam_pipeline import Pipeline, fingerprints, launcher
from beam_pipeline.artifacts import EXAMPLES, STATISTICS
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineRunError
from tests.helpers import executions_by_state, store_at
from transforms.example_gen import ExampleGen
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen


@pytest.fixture(autouse=True)
def _private_memo(tmp_path, monkeypatch):
    """Fingerprints and types are remembered in the test's own directory, not the user's cache."""
    monkeypatch.setenv(fingerprints.CACHE_DIR_ENV, str(tmp_path / "memo"))


class _FailWhileFileExists(Component):
    """Test component: fails while a flag file exists, otherwise writes its input's split names."""

    INPUTS = {"statistics": InputSpec(STATISTICS)}
    OUTPUTS = {"report": STATISTICS}

    def __init__(self, *, statistics: Channel, flag: str):
        super().__init__(inputs={"statistics": statistics}, params={}, component_id="Flaky")
        self._flag = flag

    def expand(self, inputs):
        flag, uri = self._flag, self.ctx.output_uri("report")

        def check(stats, split):
            if os.path.exists(flag):
                raise RuntimeError(f"flaky failure ({flag} exists)")
            os.makedirs(os.path.join(uri, f"Split-{split}"), exist_ok=True)
            with open(os.path.join(uri, f"Split-{split}", "FeatureStats.pb"), "wb") as f:
                f.write(stats.SerializeToString())
            return {"split_names": [split]}

        done = [pc | f"Check[{s}]" >> beam.Map(check, s) for s, pc in inputs["statistics"].items()]
        self.ctx.publish("report", done | beam.Flatten())
        return {"report": inputs["statistics"]}


class _FusedFlaky(Component):
    """Test component fused with its producer: fails while a flag file exists, else counts the rows."""

    INPUTS = {"examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"report": STATISTICS}
    FUSE_WITH_PRODUCERS = True

    def __init__(self, *, examples: Channel, flag: str):
        super().__init__(inputs={"examples": examples}, params={}, component_id="FusedFlaky")
        self._flag = flag

    def expand(self, inputs):
        flag = self._flag

        def check(batch):
            if os.path.exists(flag):
                raise RuntimeError(f"flaky failure ({flag} exists)")
            return batch.num_rows

        rows = [pc | f"Check[{s}]" >> beam.Map(check) for s, pc in inputs["examples"].items()]
        total = rows | beam.Flatten() | beam.CombineGlobally(sum)
        self.ctx.publish("report", total | beam.Map(lambda n: {"rows": n}))
        return {"report": total}


def _pipeline(data, root, **kwargs) -> Pipeline:
    gen = ExampleGen(input_base=data)
    stats = StatisticsGen(examples=gen.outputs.examples, **kwargs)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    return Pipeline("cache", str(root), [gen, stats, schema])


def _states(result) -> dict[str, str]:
    return {c.id: c.state for c in result.components.values()}


@pytest.fixture
def data(tmp_path, taxi_small_csv):
    path = tmp_path / "in" / "data.csv"
    path.parent.mkdir()
    shutil.copy(taxi_small_csv, path)
    return path


def test_unchanged_pipeline_runs_nothing_and_records_the_reuse(tmp_path, data):
    first = launcher.run(_pipeline(str(data), tmp_path / "root"))
    assert set(_states(first).values()) == {"COMPLETE"}
    second = launcher.run(_pipeline(str(data), tmp_path / "root"))
    assert set(_states(second).values()) == {"CACHED"}
    for cid in ("ExampleGen", "StatisticsGen", "SchemaGen"):
        [out] = second.components[cid].artifacts.values()
        assert out.id == next(iter(first.components[cid].artifacts.values())).id
    # The new run's context holds CACHED executions linked to the original outputs.
    store = launcher.compile_run  # noqa: F841 (documenting that queries go through the store below)
    from beam_pipeline.metadata import MetadataStore

    mlmd = MetadataStore(os.path.join(tmp_path, "root", "metadata.sqlite")).mlmd
    run_ctx = mlmd.get_context_by_type_and_name("pipeline_run", f"cache.{second.run_id}")
    executions = mlmd.get_executions_by_context(run_ctx.id)
    assert len(executions) == 3 and all(e.last_known_state == e.CACHED for e in executions)
    outputs = {
        ev.artifact_id for ev in mlmd.get_events_by_execution_ids([e.id for e in executions]) if ev.type == ev.OUTPUT
    }
    assert outputs == {next(iter(r.artifacts.values())).id for r in first.components.values()}


def test_touching_the_data_keeps_the_cache_but_new_content_reruns_everything(tmp_path, data):
    launcher.run(_pipeline(str(data), tmp_path / "root"))
    os.utime(data, (1, 1))  # mtime changes, content does not
    assert set(_states(launcher.run(_pipeline(str(data), tmp_path / "root"))).values()) == {"CACHED"}
    with open(data, "a") as f:
        f.write(",9.5,5,19,6,1400269500,,,,,0.0,,,Cash,Acme,60,,0.0\n")
    again = launcher.run(_pipeline(str(data), tmp_path / "root"))
    assert set(_states(again).values()) == {"COMPLETE"}
    assert sum(again.artifact("ExampleGen", "examples").properties["row_counts"].values()) == 1501


def test_config_change_reruns_that_component_and_downstream_only(tmp_path, data):
    launcher.run(_pipeline(str(data), tmp_path / "root"))
    changed = launcher.run(_pipeline(str(data), tmp_path / "root", num_top_values=5))
    assert _states(changed) == {"ExampleGen": "CACHED", "StatisticsGen": "COMPLETE", "SchemaGen": "COMPLETE"}


def test_no_cache_switches(tmp_path, data):
    launcher.run(_pipeline(str(data), tmp_path / "root"))
    assert set(_states(launcher.run(_pipeline(str(data), tmp_path / "root"), enable_cache=False)).values()) == {
        "COMPLETE"
    }
    pipeline = _pipeline(str(data), tmp_path / "root")
    pipeline.component("StatisticsGen").with_cache(False)
    assert _states(launcher.run(pipeline)) == {
        "ExampleGen": "CACHED",
        "StatisticsGen": "COMPLETE",
        "SchemaGen": "COMPLETE",  # its input is a new artifact, so its key is new too
    }


def test_deleted_artifact_files_are_not_reused(tmp_path, data):
    first = launcher.run(_pipeline(str(data), tmp_path / "root"))
    shutil.rmtree(first.artifact("StatisticsGen", "statistics").uri)
    again = launcher.run(_pipeline(str(data), tmp_path / "root"))
    assert _states(again) == {"ExampleGen": "CACHED", "StatisticsGen": "COMPLETE", "SchemaGen": "COMPLETE"}


def test_resume_after_a_failure_reuses_what_completed(tmp_path, data):
    flag = tmp_path / "fail"
    flag.write_text("x")

    def pipeline():
        gen = ExampleGen(input_base=str(data))
        stats = StatisticsGen(examples=gen.outputs.examples)
        flaky = _FailWhileFileExists(statistics=stats.outputs.statistics, flag=str(flag))
        return Pipeline("resume", str(tmp_path / "root"), [gen, stats, flaky])

    with pytest.raises(PipelineRunError, match="flaky failure"):
        launcher.run(pipeline())
    flag.unlink()
    resumed = launcher.run(pipeline())
    assert _states(resumed) == {"ExampleGen": "CACHED", "StatisticsGen": "CACHED", "Flaky": "COMPLETE"}


def test_a_fused_consumer_failing_takes_its_producer_with_it(tmp_path, data):
    """FUSE_WITH_PRODUCERS trades resume granularity for speed: the producer fails too, and nothing is published."""
    flag = tmp_path / "fail"
    flag.write_text("x")

    def pipeline():
        gen = ExampleGen(input_base=str(data))
        fused = _FusedFlaky(examples=gen.outputs.examples, flag=str(flag))
        return Pipeline("fused", str(tmp_path / "root"), [gen, fused])

    with pytest.raises(PipelineRunError, match="flaky failure"):
        launcher.run(pipeline())
    store = store_at(tmp_path / "root")
    assert executions_by_state(store) == {"FAILED": ["ExampleGen", "FusedFlaky"]}
    assert store.latest_artifacts("Examples", "fused") == []
    assert not os.listdir(tmp_path / "root" / "ExampleGen" / "examples")  # its half-written files are gone
    flag.unlink()
    again = launcher.run(pipeline())
    assert _states(again) == {"ExampleGen": "COMPLETE", "FusedFlaky": "COMPLETE"}
    rows = again.artifact("ExampleGen", "examples").properties["row_counts"]
    assert again.artifact("FusedFlaky", "report").properties["rows"] == sum(rows.values())
