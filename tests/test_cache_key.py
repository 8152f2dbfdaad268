"""The cache key is one pure function: each thing that decides an output changes it, nothing else does."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from beam_pipeline import Pipeline, caching, launcher
from beam_pipeline.artifacts import MODEL, STATISTICS, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineDefinitionError
from transforms.example_gen import ExampleGen
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen


class _Source(Component):
    OUTPUTS = {"statistics": STATISTICS}

    def __init__(self):
        super().__init__(inputs={}, component_id="Source")


class _Keyed(Component):
    """A component with one input, parameters and a module file; never run, only keyed."""

    INPUTS = {"statistics": InputSpec(STATISTICS)}
    OUTPUTS = {"report": STATISTICS}
    VERSION = "1"

    def __init__(self, statistics: Channel, module_file: str, **params):
        super().__init__(inputs={"statistics": statistics}, params={"module_file": module_file, **params})


def _stats(fingerprint: str) -> Artifact:
    return Artifact(STATISTICS, f"/root/stats/{fingerprint}", {"fingerprint": fingerprint})


@pytest.fixture
def keyed(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("def run_fn(args):\n    return 1\n")
    component = _Keyed(_Source().outputs.statistics, str(module), steps=10)
    return component, module


def _key(component, *, inputs=None, resolved=None, external=None) -> str:
    return caching.cache_key(
        component, inputs or {"statistics": [_stats("a")]}, resolved=resolved or {}, external=external
    )


def test_the_same_things_give_the_same_key(keyed):
    component, _ = keyed
    assert _key(component) == _key(component)


def test_configuration_is_in_the_key(keyed):
    component, module = keyed
    other = _Keyed(_Source().outputs.statistics, str(module), steps=11)
    assert _key(other) != _key(component)


def test_module_contents_are_in_the_key_and_its_mtime_is_not(keyed):
    component, module = keyed
    before = _key(component)
    module.touch()
    assert _key(component) == before
    module.write_text("def run_fn(args):\n    return 2\n")
    assert _key(component) != before


def test_input_fingerprints_are_in_the_key(keyed):
    component, _ = keyed
    assert _key(component, inputs={"statistics": [_stats("b")]}) != _key(component)


def test_external_inputs_are_in_the_key(keyed):
    component, _ = keyed
    assert _key(component, external="files:1") != _key(component, external="files:2")


def test_resolved_artifacts_are_in_the_key_unless_they_are_an_input(keyed):
    component, _ = keyed
    baseline = Artifact(MODEL, "/root/model/7", {"fingerprint": "m7"}, id=7)
    newer = Artifact(MODEL, "/root/model/9", {"fingerprint": "m9"}, id=9)
    none = _key(component)
    assert _key(component, resolved={"baseline_model": baseline}) != none
    assert _key(component, resolved={"baseline_model": newer}) != _key(component, resolved={"baseline_model": baseline})
    # the previous run's statistics that are this run's input: nothing new, the key stays
    assert _key(component, resolved={"previous_statistics": _stats("a")}) == none


def test_the_implementation_version_is_in_the_key(keyed, monkeypatch):
    component, _ = keyed
    before = _key(component)
    monkeypatch.setattr(_Keyed, "VERSION", "2")
    assert _key(component) != before


def test_library_versions_are_in_the_key(keyed, monkeypatch):
    component, _ = keyed
    before = _key(component)
    upgraded = {**caching.library_versions(), "tensorflow-transform": "99.0"}
    monkeypatch.setattr(caching, "library_versions", lambda: upgraded)
    assert _key(component) != before


def test_numpy_parameters_are_hashed_whole(keyed):
    _, module = keyed
    a = np.zeros(10_000)
    b = a.copy()
    b[5_000] = 1.0  # repr() would elide the middle and show both as the same array
    key_a = _key(_Keyed(_Source().outputs.statistics, str(module), weights=a))
    key_b = _key(_Keyed(_Source().outputs.statistics, str(module), weights=b))
    assert key_a != key_b
    assert key_a == _key(_Keyed(_Source().outputs.statistics, str(module), weights=a.copy()))
    assert _Keyed(_Source().outputs.statistics, str(module), rate=np.float32(0.5)).exec_properties()["rate"] == 0.5


def test_a_parameter_without_a_faithful_record_is_refused(keyed):
    _, module = keyed
    component = _Keyed(_Source().outputs.statistics, str(module), callback=object())
    with pytest.raises(PipelineDefinitionError, match=r"parameter 'callback' is a builtins.object"):
        component.exec_properties()


@pytest.mark.slow
def test_drift_against_the_previous_run_is_recomputed_when_the_previous_run_changed(tmp_path, taxi_small_csv):
    """Run on A, then B, then A again: the third ExampleValidator compares with B, so it is not reused."""
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    shutil.copy(taxi_small_csv, a)
    lines = a.read_text().splitlines(keepends=True)
    b.write_text("".join(lines[:700]))

    def run(data):
        gen = ExampleGen(input_base=str(data))
        stats = StatisticsGen(examples=gen.outputs.examples)
        schema = SchemaGen(statistics=stats.outputs.statistics)
        validator = ExampleValidator(
            statistics=stats.outputs.statistics,
            schema=schema.outputs.schema,
            drift_comparators={"payment_type": 0.01},
            drift_baseline="previous_run",
        )
        result = launcher.run(Pipeline("drift", str(tmp_path / "root"), [gen, stats, schema, validator]))
        return {c.id: c.state for c in result.components.values()}

    assert set(run(a).values()) == {"COMPLETE"}
    assert set(run(b).values()) == {"COMPLETE"}
    third = run(a)
    assert third["ExampleGen"] == "CACHED" and third["StatisticsGen"] == "CACHED"
    assert third["ExampleValidator"] == "COMPLETE", third
    assert run(a)["ExampleValidator"] == "CACHED"  # A after A: the previous statistics are its own input
