"""Evaluator: TFMA metrics on in-graph RecordBatches, blessing by value and change thresholds.

A tiny Keras model following the model contract (serving_default, from_examples, transform_features
with the transformed label `label_xf`) is built in a fixture with fixed weights, so a "good" and a
"bad" model need no training: score = sigmoid(w * x), label = x > 0.
"""

from __future__ import annotations

import json
import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
import tf_keras
from google.protobuf import json_format

from beam_pipeline.artifacts import EXAMPLES, MODEL, MODEL_BLESSING, Artifact
from beam_pipeline.dsl import Component, ComponentContext
from beam_pipeline.errors import InputDataError, MetadataError, PipelineDefinitionError
from tests.helpers import in_process_pipeline, run_components
from transforms import evaluator as ev
from transforms.pusher import Pusher

LABEL = "label_xf"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 240


class _Source(Component):
    """Stands in for the producers of the Evaluator's inputs (only its channels are used)."""

    OUTPUTS = {"examples": EXAMPLES, "model": MODEL, "blessing": MODEL_BLESSING}

    def __init__(self):
        super().__init__(inputs={})


def _channels() -> _Source:
    return _Source()


def _save_model(path: str, weight: float) -> None:
    inp = tf_keras.Input(shape=(1,), name="x_xf", dtype=tf.float32)
    out = tf_keras.layers.Dense(1, activation="sigmoid")(inp)
    model = tf_keras.Model(inp, out)
    model.layers[-1].set_weights([np.array([[weight]], np.float32), np.zeros(1, np.float32)])
    spec = {
        "x": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
        "label": tf.io.FixedLenFeature([1], tf.int64, default_value=[0]),
    }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features(examples):
        parsed = tf.io.parse_example(examples, spec)
        return {"x_xf": parsed["x"], LABEL: parsed["label"]}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def from_examples(examples):
        return {"scores": model(tf.io.parse_example(examples, spec)["x"])}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.float32, name="x"),
            tf.TensorSpec([None], tf.int64, name="trip_start_hour"),
        ]
    )
    def serving_default(x, trip_start_hour):
        return {"scores": model(tf.reshape(x, [-1, 1]))}

    model.save(
        os.path.join(path, ev.SERVING_MODEL_DIR),
        save_format="tf",
        signatures={
            "serving_default": serving_default,
            "from_examples": from_examples,
            "transform_features": transform_features,
        },
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Model artifact URIs: "good" (w=4) ranks and classifies well, "bad" (w=-4) inverts it."""
    root = tmp_path_factory.mktemp("models")
    uris = {}
    for name, weight in (("good", 4.0), ("bad", -4.0)):
        uris[name] = str(root / name)
        _save_model(uris[name], weight)
    return uris


def _batch(rows: int, seed: int) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows).astype(np.float32)
    hour = rng.integers(0, 3, rows)
    x_lists = [[float(v)] for v in x]
    for i in range(0, rows, 40):  # a missing value (empty list) every 40 rows: parsed as x=0
        x_lists[i] = []
        x[i] = 0.0
    return pa.RecordBatch.from_arrays(
        [
            pa.array(x_lists, pa.large_list(pa.float32())),
            pa.array([[int(h)] for h in hour], pa.large_list(pa.int64())),
            pa.array([[int(v > 0)] for v in x], pa.large_list(pa.int64())),
        ],
        names=["x", "trip_start_hour", "label"],
    )


ARROW_SCHEMA = _batch(1, 0).schema


def _config(**kwargs) -> tfma.EvalConfig:
    return ev.binary_classification_eval_config(LABEL, slice_features=["trip_start_hour"], **kwargs)


def _commit_factory(ctx: ComponentContext, component: Component, record_dir: str):
    """Like the compiler's commit step: merge the published dicts, record them, emit the Artifact."""

    def commit(name: str, properties: beam.PCollection) -> beam.PCollection:
        atype, uri = component.OUTPUTS[name], ctx.output_uris[name]
        path = os.path.join(record_dir, f"{component.id}.{name}.json")

        def record(dicts: list[dict]) -> Artifact:
            merged = {k: v for d in dicts for k, v in d.items()}
            with open(path, "w") as f:
                json.dump(merged, f)
            return Artifact(atype, uri, merged)

        return (
            properties
            | f"{component.id}.{name}.Gather" >> beam.combiners.ToList()
            | f"{component.id}.{name}.Commit" >> beam.Map(record)
        )

    return commit


def _apply(p, component, inputs, root, *, input_uris=None, resolved=None, input_static=None):
    """Apply `component` to `inputs` as the compiler would, with outputs under `root/<id>/<name>`."""
    ctx = ComponentContext(
        pipeline_name="test",
        pipeline_root=str(root),
        run_id="run",
        execution_id=1,
        output_uris={name: str(root / component.id / name) for name in component.OUTPUTS},
        input_static=input_static or {"examples": {"arrow_schema": ARROW_SCHEMA, "splits": ["train", "eval"]}},
        output_static={},
        resolved=resolved or {},
    )
    ctx.input_uris = input_uris or {}
    ctx.commit_factory = _commit_factory(ctx, component, str(root))
    component.bind(ctx)
    try:
        inputs | component.id >> component
    finally:
        component.bind(None)
    return ctx


def _committed(root, component_id: str, name: str) -> dict:
    with open(os.path.join(str(root), f"{component_id}.{name}.json")) as f:
        return json.load(f)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _run_evaluator(root, model_uri, config, *, baseline: Artifact | None = None, pusher_dir=None, **kwargs):
    src = _channels()
    evaluator = ev.Evaluator(examples=src.outputs.examples, model=src.outputs.model, eval_config=config, **kwargs)
    with in_process_pipeline() as p:
        model = p | "Model" >> beam.Create([Artifact(MODEL, model_uri, {})])
        examples = {
            "train": p | "Train" >> beam.Create([_batch(50, 1)]),
            "eval": p | "Eval" >> beam.Create([_batch(ROWS // 2, 2), _batch(ROWS // 2, 3)]),
        }
        ctx = _apply(
            p,
            evaluator,
            {"examples": examples, "model": model},
            root,
            input_uris={"model": model_uri},
            resolved={"baseline_model": baseline} if baseline else {},
        )
        if pusher_dir is not None:
            pusher = Pusher(model=src.outputs.model, blessing=evaluator.outputs.blessing, serving_model_dir=pusher_dir)
            _apply(p, pusher, {"model": model, "blessing": ctx.committed_outputs["blessing"]}, root)
    return ctx


# -- first model: no baseline ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_run(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    config = _config(lower_bounds={"binary_accuracy": 0.7}, max_regression={"auc": 0.0, "binary_accuracy": 0.0})
    ctx = _run_evaluator(root, models["good"], config)
    return root, ctx


def test_first_model_is_blessed_on_value_thresholds_alone(first_run, models):
    root, ctx = first_run
    props = _committed(root, "Evaluator", "blessing")
    assert props["blessed"] == 1
    assert props["model_uri"] == models["good"]
    assert "baseline_model_uri" not in props
    blessing_dir = ctx.output_uris["blessing"]
    assert os.path.exists(os.path.join(blessing_dir, ev.BLESSED_FILE))
    assert not os.path.exists(os.path.join(blessing_dir, ev.NOT_BLESSED_FILE))
    report = json.loads(_read(os.path.join(blessing_dir, ev.VALIDATION_FILE)))
    assert report["blessed"] is True and report["reasons"] == []
    assert "change thresholds were not applied" in report["summary"]


def test_evaluation_is_readable_by_tfma_loaders(first_run):
    root, ctx = first_run
    uri = ctx.output_uris["evaluation"]
    result = tfma.load_eval_result(uri)
    slices = {key for key, _ in result.slicing_metrics}
    assert slices == {(), (("trip_start_hour", 0),), (("trip_start_hour", 1),), (("trip_start_hour", 2),)}
    overall = dict(result.slicing_metrics)[()][""][""]
    for name in ("example_count", "binary_accuracy", "auc", "auc_pr", "calibration", "binary_crossentropy"):
        assert name in overall, name
    assert overall["example_count"]["doubleValue"] == ROWS
    assert overall["auc"]["doubleValue"] > 0.95
    assert any(per_slice.slice_key.ByteSize() == 0 for per_slice in tfma.load_metrics(uri))
    assert tfma.load_validation_result(uri).validation_ok
    assert _committed(root, "Evaluator", "evaluation") == {"evaluated_on": "split eval"}


def test_config_without_thresholds_never_blesses(first_run, tmp_path):
    _, ctx = first_run
    judge = ev._Judge(
        evaluation_uri=ctx.output_uris["evaluation"],
        blessing_uri=str(tmp_path),
        baseline_uri=None,
        has_thresholds=False,
    )
    props = judge(1, Artifact(MODEL, "/models/m", {}))
    assert props["blessed"] == 0
    assert "no thresholds" in _read(str(tmp_path / ev.NOT_BLESSED_FILE))


# -- a model worse than the blessed baseline ------------------------------------------------------------
def test_model_worse_than_baseline_is_not_blessed_and_not_pushed(models, tmp_path):
    serving = tmp_path / "serving"
    baseline = Artifact(MODEL, models["good"], {}, id=7)
    # The value threshold is met; only the comparison with the baseline fails.
    config = _config(lower_bounds={"binary_accuracy": 0.0}, max_regression={"binary_accuracy": 0.0, "auc": 0.01})
    ctx = _run_evaluator(tmp_path, models["bad"], config, baseline=baseline, pusher_dir=str(serving))

    props = _committed(tmp_path, "Evaluator", "blessing")
    assert props["blessed"] == 0
    assert props["baseline_model_uri"] == models["good"]
    report = json.loads(_read(os.path.join(ctx.output_uris["blessing"], ev.VALIDATION_FILE)))
    overall = [r for r in report["reasons"] if r["slice"] == "Overall"]
    assert {r["metric"] for r in overall} == {"binary_accuracy", "auc"}
    accuracy = next(r for r in overall if r["metric"] == "binary_accuracy")
    assert accuracy["change"] < 0 and accuracy["baseline_value"] > accuracy["value"]
    assert accuracy["threshold"]["changeThreshold"]["direction"] == "HIGHER_IS_BETTER"
    text = _read(os.path.join(ctx.output_uris["blessing"], ev.NOT_BLESSED_FILE))
    assert "binary_accuracy on slice Overall: 0.025 vs baseline 1 (change -0.975); required change >= 0\n" in text
    assert "trip_start_hour:1" in text

    pushed = _committed(tmp_path, "Pusher", "pushed_model")
    assert pushed["pushed"] == 0
    assert "not blessed" in pushed["push_message"] and "binary_accuracy" in pushed["push_message"]
    assert not serving.exists() or not os.listdir(serving)


# -- value threshold failure on next-day data -------------------------------------------------------------
def test_next_day_csv_and_value_threshold_failure_names_metric_and_slice(models, tmp_path):
    csv = tmp_path / "next_day.csv"
    batch = _batch(90, 9)
    rows = zip(*(batch.column(i).to_pylist() for i in range(batch.num_columns)), strict=True)
    with open(csv, "w") as f:
        f.write("label,extra,trip_start_hour,x\n")  # other column order, one column the model does not use
        for x, hour, label in rows:
            f.write(f"{label[0]},zzz,{hour[0]},{x[0] if x else ''}\n")
    config = _config(lower_bounds={"binary_accuracy": 0.7})
    ctx = _run_evaluator(tmp_path, models["bad"], config, data_path=str(csv))

    evaluation = tfma.load_eval_result(ctx.output_uris["evaluation"])
    assert dict(evaluation.slicing_metrics)[()][""][""]["example_count"]["doubleValue"] == 90
    props = _committed(tmp_path, "Evaluator", "blessing")
    assert props["blessed"] == 0
    report = json.loads(_read(os.path.join(ctx.output_uris["blessing"], ev.VALIDATION_FILE)))
    slices = {r["slice"] for r in report["reasons"]}
    assert slices == {"Overall", "trip_start_hour:0", "trip_start_hour:1", "trip_start_hour:2"}
    overall = next(r for r in report["reasons"] if r["slice"] == "Overall")
    assert overall["metric"] == "binary_accuracy" and overall["value"] < 0.7
    assert overall["threshold"] == {"valueThreshold": {"lowerBound": 0.7}}
    assert overall["message"].startswith("binary_accuracy on slice Overall: ")
    assert overall["message"].endswith("; required >= 0.7")
    assert _committed(tmp_path, "Evaluator", "evaluation") == {"evaluated_on": str(csv)}


# -- fast: config, resolve, compile-time checks, serialization ---------------------------------------------
def test_eval_config_is_accepted_as_proto_json_or_dict():
    config = _config(lower_bounds={"auc": 0.5})
    assert ev.parse_eval_config(json_format.MessageToJson(config)) == config
    src = _channels()
    a = ev.Evaluator(examples=src.outputs.examples, model=src.outputs.model, eval_config=config)
    b = ev.Evaluator(examples=src.outputs.examples, model=src.outputs.model, eval_config=a.params["eval_config"])
    assert a.eval_config == b.eval_config
    assert a.eval_config.model_specs[0].model_type == tfma.TF_GENERIC
    json.dumps(a.exec_properties())


@pytest.mark.parametrize(
    "config, message",
    [
        (tfma.EvalConfig(metrics_specs=[tfma.MetricsSpec()]), "label_key is required"),
        (
            tfma.EvalConfig(
                model_specs=[tfma.ModelSpec(label_key="y"), tfma.ModelSpec(label_key="y", is_baseline=True)]
            ),
            "one ModelSpec",
        ),
        (tfma.EvalConfig(model_specs=[tfma.ModelSpec(label_key="y")]), "no metrics_specs"),
        ('{"modelSpecs": [{"labelKey": 3', "not a valid tfma.EvalConfig"),
    ],
)
def test_bad_eval_config_is_rejected(config, message):
    src = _channels()
    with pytest.raises(PipelineDefinitionError, match=message):
        ev.Evaluator(examples=src.outputs.examples, model=src.outputs.model, eval_config=config)


def test_threshold_helper_rejects_unknown_metrics_and_directions():
    with pytest.raises(PipelineDefinitionError, match="unknown metrics"):
        _config(lower_bounds={"accuracy": 0.5})
    with pytest.raises(PipelineDefinitionError, match="calibration"):
        _config(max_regression={"calibration": 0.1})
    loss = next(
        m
        for m in _config(max_regression={"binary_crossentropy": 0.05}).metrics_specs[0].metrics
        if m.class_name == "BinaryCrossentropy"
    )
    assert loss.threshold.change_threshold.direction == tfma.MetricDirection.LOWER_IS_BETTER
    assert loss.threshold.change_threshold.absolute.value == pytest.approx(0.05)


class _FakeStore:
    def __init__(self, artifacts: list[Artifact]):
        self.artifacts = artifacts
        self.queries: list[tuple] = []

    def latest_artifacts(self, type_name, pipeline_name, properties=None):
        self.queries.append((type_name, pipeline_name, properties))
        found = [
            a
            for a in self.artifacts
            if a.type.name == type_name and all(a.properties.get(k) == v for k, v in (properties or {}).items())
        ]
        return sorted(found, key=lambda a: a.id, reverse=True)


def test_resolve_finds_the_model_of_the_latest_blessing():
    src = _channels()
    evaluator = ev.Evaluator(
        examples=src.outputs.examples, model=src.outputs.model, eval_config=_config(max_regression={"auc": 0.0})
    )
    blessing = {"producer_component": "Evaluator"}
    store = _FakeStore(
        [
            Artifact(MODEL, "/m/1", {}, id=1),
            Artifact(MODEL, "/m/2", {}, id=2),
            Artifact(MODEL, "/m/3", {}, id=3),
            Artifact(MODEL_BLESSING, "/b/1", {**blessing, "blessed": 1, "model_uri": "/m/1"}, id=4),
            Artifact(MODEL_BLESSING, "/b/2", {**blessing, "blessed": 1, "model_uri": "/m/2"}, id=5),
            Artifact(MODEL_BLESSING, "/b/3", {**blessing, "blessed": 0, "model_uri": "/m/3"}, id=6),
            Artifact(MODEL_BLESSING, "/b/x", {"producer_component": "Other", "blessed": 1, "model_uri": "/m/3"}, id=7),
        ]
    )
    no_baseline = evaluator.external_fingerprint()
    assert evaluator.resolve(store, "p") == {"baseline_model": Artifact(MODEL, "/m/2", {}, id=2)}
    assert evaluator.external_fingerprint() != no_baseline  # a new baseline means a new evaluation
    assert (
        ev.Evaluator(examples=src.outputs.examples, model=src.outputs.model, eval_config=_config()).resolve(
            _FakeStore([]), "p"
        )
        == {}
    )
    assert evaluator.resolve(_FakeStore([]), "p") == {}
    orphan = _FakeStore([Artifact(MODEL_BLESSING, "/b/1", {**blessing, "blessed": 1, "model_uri": "/gone"}, id=1)])
    with pytest.raises(MetadataError, match="/gone"):
        evaluator.resolve(orphan, "p")


def test_static_outputs_checks_split_and_next_day_columns(tmp_path):
    src = _channels()
    static = {"examples": {"arrow_schema": ARROW_SCHEMA, "splits": ["train", "eval"]}}
    evaluator = ev.Evaluator(
        examples=src.outputs.examples, model=src.outputs.model, eval_config=_config(), example_split="test"
    )
    with pytest.raises(PipelineDefinitionError, match="'test' is not one of the splits"):
        evaluator.static_outputs(static)
    csv = tmp_path / "d.csv"
    csv.write_text("x,label\n1.0,1\n")
    evaluator = ev.Evaluator(
        examples=src.outputs.examples, model=src.outputs.model, eval_config=_config(), data_path=str(csv)
    )
    with pytest.raises(InputDataError, match=r"missing columns \['trip_start_hour'\]"):
        evaluator.static_outputs(static)
    assert evaluator.external_fingerprint()
    missing = ev.Evaluator(
        examples=src.outputs.examples,
        model=src.outputs.model,
        eval_config=_config(),
        data_path=str(tmp_path / "no*.csv"),
    )
    with pytest.raises(InputDataError, match="matches no file"):
        missing.static_outputs(static)


def test_serialized_examples_leave_missing_values_absent():
    batch = _batch(3, 0)  # row 0 has an empty x
    fn = ev._AddSerializedExamples()
    fn.setup()
    [out] = list(fn.process(batch))
    assert out.schema.names == [*batch.schema.names, tfma.ARROW_INPUT_COLUMN]
    raw = out.column(out.schema.names.index(tfma.ARROW_INPUT_COLUMN)).to_pylist()
    first, second = (tf.train.Example.FromString(r[0]) for r in raw[:2])
    # A feature without a value list: parse_example treats it as missing and applies the default.
    assert first.features.feature["x"].WhichOneof("kind") is None
    assert first.features.feature["label"].int64_list.value == [0]
    assert second.features.feature["x"].float_list.value[0] == pytest.approx(batch.column(0)[1].as_py()[0])


# -- end to end ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_taxi_pipeline_blesses_pushes_then_reuses_everything_when_unchanged(tmp_path, taxi_small_csv):
    from transforms.example_gen import ExampleGen
    from transforms.schema_gen import SchemaGen
    from transforms.statistics_gen import StatisticsGen
    from transforms.trainer import Trainer
    from transforms.transform import Transform

    module = str(tmp_path / "taxi_utils.py")  # a copy: an edit between the two runs would retrain
    shutil.copy(os.path.join(ROOT, "examples", "chicago_taxi", "taxi_utils.py"), module)
    serving = tmp_path / "serving"
    config = ev.binary_classification_eval_config(
        "tips_xf",  # taxi_utils.LABEL_KEY, the transformed label
        slice_features=["trip_start_hour"],
        lower_bounds={"binary_accuracy": 0.5},
        max_regression={"auc": 0.0},
    )

    def components() -> list[Component]:
        """A fresh pipeline definition (a PTransform is bound to the Beam graph it was applied to)."""
        gen = ExampleGen(input_base=taxi_small_csv)
        stats = StatisticsGen(examples=gen.outputs.examples)
        schema = SchemaGen(statistics=stats.outputs.statistics)
        transform = Transform(examples=gen.outputs.examples, schema=schema.outputs.schema, module_file=module)
        trainer = Trainer(
            examples=transform.outputs.transformed_examples,
            transform_graph=transform.outputs.transform_graph,
            module_file=module,
            train_steps=30,
            eval_steps=5,
        )
        evaluator = ev.Evaluator(examples=gen.outputs.examples, model=trainer.outputs.model, eval_config=config)
        pusher = Pusher(
            model=trainer.outputs.model, blessing=evaluator.outputs.blessing, serving_model_dir=str(serving)
        )
        return [gen, stats, schema, transform, trainer, evaluator, pusher]

    first = run_components(tmp_path / "root", components(), name="taxi")
    model = first.artifact("Trainer", "model")
    blessing = first.artifact("Evaluator", "blessing")
    assert blessing.properties["blessed"] == 1, blessing.properties["blessing_message"]
    assert blessing.properties["model_uri"] == model.uri
    evaluation = tfma.load_eval_result(first.artifact("Evaluator", "evaluation").uri)
    overall = dict(evaluation.slicing_metrics)[()][""][""]
    assert (
        overall["example_count"]["doubleValue"]
        == first.artifact("ExampleGen", "examples").properties["row_counts"]["eval"]
    )
    assert len(evaluation.slicing_metrics) > 10  # overall + one slice per trip_start_hour seen
    pushed = first.artifact("Pusher", "pushed_model").properties
    assert (pushed["pushed"], pushed["pushed_version"]) == (1, 1)
    assert os.path.exists(os.path.join(pushed["pushed_destination"], "saved_model.pb"))

    # Second run: the blessed baseline is the cached model itself, which changes no decision, so the
    # evaluation and the push are reused too; no new version.
    second = run_components(tmp_path / "root", components(), name="taxi")
    assert {c: second.components[c].state for c in ("Trainer", "Evaluator", "Pusher")} == dict.fromkeys(
        ("Trainer", "Evaluator", "Pusher"), "CACHED"
    )
    blessing = second.artifact("Evaluator", "blessing").properties
    assert blessing["blessed"] == 1 and blessing["model_uri"] == model.uri
    pushed = second.artifact("Pusher", "pushed_model").properties
    assert (pushed["pushed"], pushed["pushed_version"]) == (1, 1)
    assert os.listdir(serving) == ["1"]
