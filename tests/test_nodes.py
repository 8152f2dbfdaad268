"""Importer and Resolver nodes in real pipelines: settled when the run is planned, recorded with lineage."""

from __future__ import annotations

import shutil

import pytest
import tensorflow_data_validation as tfdv
from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2
from tensorflow_metadata.proto.v0 import schema_pb2

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import MODEL, SCHEMA
from beam_pipeline.errors import PipelineDefinitionError
from beam_pipeline.lineage import lineage
from beam_pipeline.nodes import Importer, LatestArtifact, LatestBlessedModel, Resolver
from tests.conftest import PENGUIN_CSV
from tests.helpers import run_components, store_at
from tests.test_trainer import taxi_trainer_components
from transforms import evaluator as ev
from transforms.example_gen import ExampleGen
from transforms.example_validator import ExampleValidator
from transforms.schema_gen import SchemaGen
from transforms.statistics_gen import StatisticsGen


def _penguin_stats():
    gen = ExampleGen(input_base=PENGUIN_CSV)
    return [gen, StatisticsGen(examples=gen.outputs.examples)]


def _validated_by(curated: str) -> list:
    gen, stats = _penguin_stats()
    schema = Importer(source_uri=curated, artifact_type=SCHEMA, component_id="CuratedSchema")
    validator = ExampleValidator(statistics=stats.outputs.statistics, schema=schema.outputs.result)
    return [gen, stats, schema, validator]


def _execution_inputs(store, execution_id: int) -> dict[str, list[int]]:
    inputs, _ = store.execution_artifacts(execution_id)
    return {name: [a.id for a in arts] for name, arts in inputs.items()}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A schema SchemaGen inferred from the penguin data in a real run, copied out as a curated one."""
    tmp = tmp_path_factory.mktemp("importer")
    gen, stats = _penguin_stats()
    inferred = run_components(tmp / "infer", [gen, stats, SchemaGen(statistics=stats.outputs.statistics)])
    curated = tmp / "curated"
    curated.mkdir()
    shutil.copy(artifact_io.join(inferred.artifact("SchemaGen", "schema").uri, artifact_io.SCHEMA_FILE), curated)
    return tmp, str(curated)


@pytest.mark.slow
def test_an_imported_schema_feeds_a_component_with_lineage_and_caching(curated):
    tmp, curated_dir = curated
    root = tmp / "root"
    first = run_components(root, _validated_by(curated_dir), name="imported")
    imported = first.artifact("CuratedSchema", "result")
    assert first.components["CuratedSchema"].state == "COMPLETE"
    assert imported.uri == curated_dir and imported.type == SCHEMA
    assert first.artifact("ExampleValidator", "anomalies").properties["anomaly_count"] == 0

    store = store_at(root)
    validator_run = first.components["ExampleValidator"].execution_id
    assert _execution_inputs(store, validator_run)["schema"] == [imported.id]
    graph = lineage(store, first.artifact("ExampleValidator", "anomalies").id, num_hops=3, direction="up")
    importer_node = f"execution:{first.components['CuratedSchema'].execution_id}"
    assert importer_node in {n["node"] for n in graph.nodes}  # anomalies <- validator <- schema <- Importer

    # Unchanged files: the same artifact is linked again and the validator stays cached.
    second = run_components(root, _validated_by(curated_dir), name="imported")
    assert second.artifact("CuratedSchema", "result").id == imported.id
    assert second.components["ExampleValidator"].state == "CACHED"

    # A curated edit (body mass now must be at most 0.5): a new artifact, the validator reruns and sees it.
    path = artifact_io.join(curated_dir, artifact_io.SCHEMA_FILE)
    schema = tfdv.load_schema_text(path)
    tfdv.set_domain(schema, "body_mass_g", schema_pb2.FloatDomain(min=0.0, max=0.5))
    tfdv.write_schema_text(schema, path)
    third = run_components(root, _validated_by(curated_dir), name="imported")
    assert third.artifact("CuratedSchema", "result").id != imported.id
    assert third.components["ExampleValidator"].state == "COMPLETE"
    assert third.artifact("ExampleValidator", "anomalies").properties["anomaly_count"] >= 1


def test_importing_nothing_fails_the_plan_naming_the_directory(tmp_path):
    gen, stats = _penguin_stats()
    schema = Importer(source_uri=str(tmp_path / "absent"), artifact_type=SCHEMA, component_id="Curated")
    validator = ExampleValidator(statistics=stats.outputs.statistics, schema=schema.outputs.result)
    with pytest.raises(PipelineDefinitionError, match=r"Curated: no files under .*absent to import as Schema"):
        run_components(tmp_path / "root", [gen, stats, schema, validator])
    with pytest.raises(PipelineDefinitionError, match="must be an ArtifactType"):
        Importer(source_uri=str(tmp_path), artifact_type="Schema")


def test_a_resolver_that_finds_nothing_for_a_required_input_fails_the_plan(tmp_path):
    gen, stats = _penguin_stats()
    latest = Resolver(LatestArtifact(SCHEMA, producer="SchemaGen"), component_id="LatestSchema")
    validator = ExampleValidator(statistics=stats.outputs.statistics, schema=latest.outputs.artifact)
    with pytest.raises(PipelineDefinitionError, match="comes from LatestSchema, which found no Schema this run"):
        run_components(tmp_path / "root", [gen, stats, latest, validator], name="p")
    with pytest.raises(PipelineDefinitionError, match="must be a ResolverStrategy"):
        Resolver(MODEL)


# -- a Resolver feeding the Evaluator its baseline ---------------------------------------------------------
CONFIG = ev.binary_classification_eval_config(
    "tips_xf",
    lower_bounds={"auc": 0.3},
    max_regression={"auc": 0.5},  # loose: each model here is blessed
)


def _judged(data: str, train_steps: int) -> list:
    components = taxi_trainer_components(data, train_steps=train_steps)
    gen, trainer = components[0], components[-1]
    baseline = Resolver(LatestBlessedModel(evaluator="Evaluator"), component_id="LatestBlessedModel")
    evaluator = ev.Evaluator(
        examples=gen.outputs.examples,
        model=trainer.outputs.model,
        baseline_model=baseline.outputs.model,
        eval_config=CONFIG,
    )
    return [*components, baseline, evaluator]


@pytest.mark.slow
def test_a_resolver_gives_the_evaluator_the_latest_blessed_model_as_its_baseline(tmp_path, taxi_small_csv):
    root = tmp_path / "root"
    first = run_components(root, _judged(taxi_small_csv, 20), name="judged")
    assert first.components["LatestBlessedModel"].artifacts == {}  # nothing blessed yet: no baseline
    assert first.artifact("Evaluator", "blessing").properties["blessed"] == 1
    model_1 = first.artifact("Trainer", "model")

    # The same pipeline again: the resolver finds the candidate itself, which adds nothing: all cached.
    second = run_components(root, _judged(taxi_small_csv, 20), name="judged")
    assert second.artifact("LatestBlessedModel", "model").id == model_1.id
    assert {c.state for n, c in second.components.items() if n != "LatestBlessedModel"} == {"CACHED"}

    # A new model is judged against the resolved one, which is recorded as the Evaluator's input.
    third = run_components(root, _judged(taxi_small_csv, 30), name="judged")
    assert third.components["Evaluator"].state == "COMPLETE"
    blessing = third.artifact("Evaluator", "blessing").properties
    assert blessing["baseline_model_uri"] == model_1.uri and blessing["blessed"] == 1
    store = store_at(root)
    assert _execution_inputs(store, third.components["Evaluator"].execution_id)["baseline_model"] == [model_1.id]
    [resolver_run] = store.mlmd.get_executions_by_id([third.components["LatestBlessedModel"].execution_id])
    assert resolver_run.last_known_state == mlmd_pb2.Execution.COMPLETE
