"""Training/serving skew: ExampleValidator compares training statistics with those of serving data (own ExampleGen)."""

from __future__ import annotations

import csv

import pytest

from beam_pipeline.errors import PipelineDefinitionError
from tests.conftest import PENGUIN_CSV
from tests.helpers import run_components
from transforms.example_gen import ExampleGen
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen


def _serving_file(path, body_mass_scale: float) -> None:
    """The penguin rows without their label, as requests log them; body mass scaled (1000 = a kg/g unit bug)."""
    with open(PENGUIN_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as out:
        fields = [k for k in rows[0] if k != "species"]
        writer = csv.DictWriter(out, fields)
        writer.writeheader()
        for row in rows:
            row = {k: row[k] for k in fields}
            row["body_mass_g"] = str(float(row["body_mass_g"]) * body_mass_scale)
            writer.writerow(row)


def _components(serving_csv: str) -> list:
    train_gen = ExampleGen(input_base=PENGUIN_CSV)
    stats = StatisticsGen(examples=train_gen.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    serving_gen = ExampleGen(input_base=serving_csv, splits={"serving": 1}, component_id="ServingExampleGen")
    serving_stats = StatisticsGen(examples=serving_gen.outputs.examples, component_id="ServingStatisticsGen")
    validator = ExampleValidator(
        statistics=stats.outputs.statistics,
        schema=schema.outputs.schema,
        serving_statistics=serving_stats.outputs.statistics,
        skew_comparators={"body_mass_g": 0.1, "flipper_length_mm": 0.1},
    )
    return [train_gen, stats, schema, serving_gen, serving_stats, validator]


@pytest.mark.slow
def test_skew_against_serving_data_is_flagged_per_feature(tmp_path):
    skewed, same = tmp_path / "skewed.csv", tmp_path / "same.csv"
    _serving_file(skewed, body_mass_scale=1000.0)
    _serving_file(same, body_mass_scale=1.0)

    result = run_components(tmp_path / "skewed-root", _components(str(skewed)), name="skew")
    report = result.artifact("ExampleValidator", "anomalies").properties["anomalies"]
    train_lines = report["train"]
    skew = [line for line in train_lines if "between training and serving" in line]
    assert [line.split(":")[0] for line in skew] == ["body_mass_g"], train_lines
    assert not any("between training and serving" in line for line in report["eval"])  # only skew_split is compared

    clean = run_components(tmp_path / "same-root", _components(str(same)), name="skew")
    lines = clean.artifact("ExampleValidator", "anomalies").properties["anomalies"]["train"]
    assert not any("between training and serving" in line for line in lines), lines


def test_skew_needs_serving_statistics_and_comparators_together(tmp_path):
    gen = ExampleGen(input_base=PENGUIN_CSV)
    stats = StatisticsGen(examples=gen.outputs.examples)
    schema = SchemaGen(statistics=stats.outputs.statistics)
    with pytest.raises(PipelineDefinitionError, match="skew needs both serving_statistics and skew_comparators"):
        ExampleValidator(statistics=stats.outputs.statistics, schema=schema.outputs.schema, skew_comparators={"x": 0.1})
    with pytest.raises(PipelineDefinitionError, match="skew needs both"):
        ExampleValidator(
            statistics=stats.outputs.statistics,
            schema=schema.outputs.schema,
            serving_statistics=stats.outputs.statistics,
        )
