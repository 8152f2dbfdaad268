"""Pipeline definition errors are reported before anything runs."""

from __future__ import annotations

import pytest

from beam_pipeline import Pipeline
from beam_pipeline.errors import PipelineDefinitionError
from transforms.example_gen import ExampleGen
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen


def _data_half(path="unused.csv"):
    gen = ExampleGen(input_base=path)
    stats = StatisticsGen(examples=gen.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    validator = ExampleValidator(statistics=stats.outputs.statistics, schema=schema.outputs.schema)
    return gen, stats, schema, validator


def test_topological_order_follows_inputs_not_listing_order(tmp_path):
    gen, stats, schema, validator = _data_half()
    p = Pipeline("p", str(tmp_path), [validator, schema, stats, gen])
    assert [c.id for c in p.ordered] == ["ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator"]


def test_duplicate_component_ids_are_rejected(tmp_path):
    gen, stats, *_ = _data_half()
    other = StatisticsGen(examples=gen.outputs.examples)
    with pytest.raises(PipelineDefinitionError, match="duplicate component id 'StatisticsGen'"):
        Pipeline("p", str(tmp_path), [gen, stats, other])
    Pipeline("p", str(tmp_path), [gen, stats, other.with_id("StatisticsGen2")])


def test_cycle_is_rejected_with_its_path(tmp_path):
    gen, stats, schema, validator = _data_half()
    # Wire the statistics input to a channel produced downstream of it.
    stats.inputs["examples"] = validator.outputs.anomalies
    with pytest.raises(PipelineDefinitionError, match=r"cycle between components: .*StatisticsGen"):
        Pipeline("p", str(tmp_path), [gen, stats, schema, validator])


def test_missing_required_input():
    with pytest.raises(PipelineDefinitionError, match=r"input 'statistics' .* is required"):
        SchemaGen(statistics=None)


def test_mistyped_input_names_both_types():
    gen = ExampleGen(input_base="unused.csv")
    with pytest.raises(PipelineDefinitionError, match="expects ExampleStatistics, got Examples from ExampleGen"):
        SchemaGen(statistics=gen.outputs.examples)


def test_input_that_is_not_a_channel():
    with pytest.raises(PipelineDefinitionError, match="must be a channel"):
        SchemaGen(statistics="stats.pb")


def test_producer_missing_from_pipeline(tmp_path):
    _gen, stats, *_ = _data_half()
    with pytest.raises(PipelineDefinitionError, match="comes from ExampleGen, which is not in the pipeline"):
        Pipeline("p", str(tmp_path), [stats])


def test_bad_ids_and_options():
    with pytest.raises(PipelineDefinitionError, match="component id"):
        ExampleGen(input_base="x.csv").with_id("bad id!")
    with pytest.raises(PipelineDefinitionError, match="format 'xml'"):
        ExampleGen(input_base="x.csv", format="xml")
    with pytest.raises(PipelineDefinitionError, match="positive integer weights"):
        ExampleGen(input_base="x.csv", splits={"train": 0})
    with pytest.raises(PipelineDefinitionError, match="on_bad_record"):
        ExampleGen(input_base="x.csv", on_bad_record="ignore")
