"""Evaluator in real pipelines: the taxi model (ExampleGen → ... → Trainer) judged by TFMA, then pushed or not.

Two models of known quality come from real Trainer runs on the same 1,500 rows: a good one
(GOOD_STEPS steps) and a weak one (1 step). Training is seeded and deterministic, and every threshold
that must be met is met by a wide margin on a large slice (value thresholds apply to the whole eval
split; per-hour slices hold ~20 rows, too few to judge a model on).
"""

from __future__ import annotations

import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from google.protobuf import json_format

from beam_pipeline.artifacts import MODEL, MODEL_BLESSING, Artifact
from beam_pipeline.errors import InputDataError, MetadataError, PipelineDefinitionError
from tests.helpers import run_components, store_at
from tests.test_trainer import split_rows, taxi_trainer_components
from tests.test_transform import TAXI_CSV, taxi_sample
from transforms import evaluate_model
from transforms import evaluator as ev
from transforms.example_gen import ExampleGen
from transforms.pusher import Pusher
from transforms.schema_gen import SchemaGen

LABEL = "tips_xf"  # taxi_utils.LABEL_KEY, the transformed label
GOOD_STEPS = 100
WEAK_STEPS = 1
# Met by the good model with a wide margin: it scores AUC 0.937, accuracy 0.861 (the weak one 0.468, 0.573).
BLESS_BOUNDS = {"auc": 0.75, "binary_accuracy": 0.7}
NEXT_DAY_ROWS = 600


def _overall_only(config: tfma.EvalConfig) -> tfma.EvalConfig:
    """Move every value threshold from all slices to the Overall slice; change thresholds stay per slice."""
    for metric in config.metrics_specs[0].metrics:
        if metric.threshold.HasField("value_threshold"):
            per_slice = metric.per_slice_thresholds.add(slicing_specs=[tfma.SlicingSpec()])
            per_slice.threshold.value_threshold.CopyFrom(metric.threshold.value_threshold)
            metric.threshold.ClearField("value_threshold")
            if not metric.threshold.HasField("change_threshold"):
                metric.ClearField("threshold")
    return config


def _config(**thresholds) -> tfma.EvalConfig:
    return _overall_only(ev.binary_classification_eval_config(LABEL, slice_features=["trip_start_hour"], **thresholds))


BLESS_CONFIG = _config(lower_bounds=BLESS_BOUNDS, max_regression={"auc": 0.0, "binary_accuracy": 0.0})
# The weak model misses this on the whole next-day file by a wide margin (it scores 0.593).
NEXT_DAY_BOUND = 0.8
NEXT_DAY_CONFIG = ev.binary_classification_eval_config(
    LABEL, slice_features=["trip_start_hour"], lower_bounds={"binary_accuracy": NEXT_DAY_BOUND}
)


def _schema_gen(components: list) -> SchemaGen:
    return next(c for c in components if isinstance(c, SchemaGen))


def _pipeline(data: str, serving: str, train_steps: int, *extra: str, next_day: str | None = None) -> list:
    """A fresh taxi pipeline definition: the Trainer, the blessing Evaluator and the Pusher, plus
    "UnjudgedEvaluator" (no thresholds) and/or "NextDayEvaluator" (value thresholds on `next_day`)."""
    components = taxi_trainer_components(data, train_steps=train_steps)
    gen, trainer = components[0], components[-1]
    evaluator = ev.Evaluator(examples=gen.outputs.examples, model=trainer.outputs.model, eval_config=BLESS_CONFIG)
    components += [evaluator]
    if "unjudged" in extra:
        config = ev.binary_classification_eval_config(LABEL, slice_features=["trip_start_hour"])
        components.append(
            ev.Evaluator(
                examples=gen.outputs.examples,
                model=trainer.outputs.model,
                eval_config=config,
                component_id="UnjudgedEvaluator",
            )
        )
    if next_day:  # as in TFX: the next day's data is an ExampleGen of its own, typed by the training schema
        next_day_gen = ExampleGen(input_base=next_day, splits={"day": 1}, component_id="NextDayExampleGen")
        components += [
            next_day_gen,
            ev.Evaluator(
                examples=next_day_gen.outputs.examples,
                model=trainer.outputs.model,
                schema=_schema_gen(components).outputs.schema,
                eval_config=NEXT_DAY_CONFIG,
                example_split="day",
                component_id="NextDayEvaluator",
            ),
        ]
    pusher = Pusher(model=trainer.outputs.model, blessing=evaluator.outputs.blessing, serving_model_dir=serving)
    return [*components, pusher]


@pytest.fixture(scope="module")
def taxi(tmp_path_factory, taxi_small_csv):
    tmp = tmp_path_factory.mktemp("evaluator")
    return {"data": taxi_small_csv, "root": tmp / "root", "serving": str(tmp / "serving"), "tmp": tmp}


def _run(taxi, train_steps: int, *extra: str, next_day: str | None = None):
    components = _pipeline(taxi["data"], taxi["serving"], train_steps, *extra, next_day=next_day)
    return run_components(taxi["root"], components, name="taxi")


@pytest.fixture(scope="module")
def first(taxi):
    """The first run: a good model, no blessed baseline yet."""
    return _run(taxi, GOOD_STEPS, "unjudged")


@pytest.fixture(scope="module")
def worse(taxi, first):
    """The next run: a 1-step model judged against the first (blessed) one, and on next-day rows (an extra
    column, columns reordered, and trip_miles in whole numbers, which their own ExampleGen types INT)."""
    next_day = taxi_sample(
        str(taxi["tmp"] / "next_day.csv"), NEXT_DAY_ROWS, skip=1500, extra_column=True, whole_numbers=["trip_miles"]
    )
    return _run(taxi, WEAK_STEPS, next_day=next_day), next_day


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _overall(evaluation_uri: str, model_name: str = "") -> dict:
    """Overall metrics of one model (the candidate, or the baseline by name), name → value."""
    for per_slice in tfma.load_metrics(evaluation_uri):
        if per_slice.slice_key.ByteSize() == 0:
            return {
                kv.key.name: kv.value.double_value.value
                for kv in per_slice.metric_keys_and_values
                if kv.key.model_name == model_name and not kv.key.is_diff and kv.value.HasField("double_value")
            }
    raise AssertionError(f"no overall slice in {evaluation_uri}")


# -- the first model: blessed on value thresholds, pushed -------------------------------------------------
def test_first_model_is_blessed_on_value_thresholds_alone(first):
    model = first.artifact("Trainer", "model")
    blessing = first.artifact("Evaluator", "blessing")
    props = blessing.properties
    assert props["blessed"] == 1, props["blessing_message"]
    assert props["model_uri"] == model.uri
    assert "baseline_model_uri" not in props
    assert os.path.exists(os.path.join(blessing.uri, ev.BLESSED_FILE))
    assert not os.path.exists(os.path.join(blessing.uri, ev.NOT_BLESSED_FILE))
    report = json.loads(_read(os.path.join(blessing.uri, ev.VALIDATION_FILE)))
    assert report["blessed"] is True and report["reasons"] == []
    assert "change thresholds were not applied" in report["summary"]

    metrics = _overall(first.artifact("Evaluator", "evaluation").uri)
    print(f"good model, overall: auc {metrics['auc']:.4f}, binary_accuracy {metrics['binary_accuracy']:.4f}")
    for name, bound in BLESS_BOUNDS.items():
        assert metrics[name] >= bound + 0.05, (name, metrics[name])  # the margin the docstring promises

    pushed = first.artifact("Pusher", "pushed_model").properties
    assert (pushed["pushed"], pushed["pushed_version"]) == (1, 1)
    assert os.path.exists(os.path.join(pushed["pushed_destination"], "saved_model.pb"))


def test_evaluation_is_readable_by_tfma_loaders(first):
    uri = first.artifact("Evaluator", "evaluation").uri
    result = tfma.load_eval_result(uri)
    eval_rows = split_rows(first, "eval")
    hours = {h[0] for h in eval_rows.column("trip_start_hour").to_pylist() if h}
    slices = {key for key, _ in result.slicing_metrics}
    assert slices == {(), *((("trip_start_hour", h),) for h in hours)}
    assert len(slices) > 10
    overall = dict(result.slicing_metrics)[()][""][""]
    for name in ("example_count", "binary_accuracy", "auc", "auc_pr", "calibration", "binary_crossentropy"):
        assert name in overall, name
    assert overall["example_count"]["doubleValue"] == eval_rows.num_rows
    assert eval_rows.num_rows == first.artifact("ExampleGen", "examples").properties["row_counts"]["eval"]
    assert tfma.load_validation_result(uri).validation_ok
    examples_uri = first.artifact("ExampleGen", "examples").uri
    assert first.artifact("Evaluator", "evaluation").properties["evaluated_on"] == f"{examples_uri} split eval"


def test_config_without_thresholds_never_blesses(first):
    blessing = first.artifact("UnjudgedEvaluator", "blessing")
    assert blessing.properties["blessed"] == 0
    assert "no thresholds" in _read(os.path.join(blessing.uri, ev.NOT_BLESSED_FILE))
    assert not os.path.exists(os.path.join(blessing.uri, ev.BLESSED_FILE))
    # The same good model, judged by the Evaluator with thresholds, was blessed.
    assert first.artifact("Evaluator", "blessing").properties["blessed"] == 1


def test_unchanged_pipeline_is_reused_entirely(taxi, first):
    """The blessed baseline is the cached model itself, which changes no decision: no new version."""
    second = _run(taxi, GOOD_STEPS, "unjudged")
    states = {c: second.components[c].state for c in ("Trainer", "Evaluator", "UnjudgedEvaluator", "Pusher")}
    assert states == dict.fromkeys(states, "CACHED")
    blessing = second.artifact("Evaluator", "blessing").properties
    assert blessing["blessed"] == 1 and blessing["model_uri"] == first.artifact("Trainer", "model").uri
    pushed = second.artifact("Pusher", "pushed_model").properties
    assert (pushed["pushed"], pushed["pushed_version"]) == (1, 1)
    assert sorted(os.listdir(taxi["serving"])) == [".push.lock", "1"]  # the Pusher's lock file


# -- a model worse than the blessed baseline ------------------------------------------------------------
def test_model_worse_than_baseline_is_not_blessed_and_not_pushed(taxi, first, worse):
    result, _ = worse
    good = _overall(first.artifact("Evaluator", "evaluation").uri)
    evaluation = result.artifact("Evaluator", "evaluation").uri
    weak, baseline = _overall(evaluation, tfma.CANDIDATE_KEY), _overall(evaluation, tfma.BASELINE_KEY)
    assert baseline == pytest.approx(good)  # the baseline is the first model, evaluated again
    print(f"weak model, overall: auc {weak['auc']:.4f}, binary_accuracy {weak['binary_accuracy']:.4f}")
    for name in ("auc", "binary_accuracy"):
        assert weak[name] < good[name] - 0.1, (name, weak[name], good[name])

    blessing = result.artifact("Evaluator", "blessing")
    assert blessing.properties["blessed"] == 0
    assert blessing.properties["baseline_model_uri"] == first.artifact("Trainer", "model").uri
    report = json.loads(_read(os.path.join(blessing.uri, ev.VALIDATION_FILE)))
    changes = [r for r in report["reasons"] if "change" in r]
    assert changes and all(r["change"] < 0 for r in changes)
    assert {r["slice"] for r in changes} - {"Overall"}, "per-hour regressions are named too"
    assert all(r["slice"].startswith("trip_start_hour:") for r in changes if r["slice"] != "Overall")
    overall = {r["metric"]: r for r in changes if r["slice"] == "Overall"}
    assert set(overall) == {"binary_accuracy", "auc"}
    accuracy = overall["binary_accuracy"]
    assert accuracy["value"] == pytest.approx(weak["binary_accuracy"])
    assert accuracy["baseline_value"] == pytest.approx(good["binary_accuracy"])
    assert accuracy["change"] == pytest.approx(weak["binary_accuracy"] - good["binary_accuracy"])
    assert accuracy["threshold"]["changeThreshold"]["direction"] == "HIGHER_IS_BETTER"
    text = _read(os.path.join(blessing.uri, ev.NOT_BLESSED_FILE))
    line = (
        f"binary_accuracy on slice Overall: {accuracy['value']:.4g} vs baseline {accuracy['baseline_value']:.4g} "
        f"(change {accuracy['change']:+.4g}); required change >= 0\n"
    )
    assert line in text

    pushed = result.artifact("Pusher", "pushed_model").properties
    assert pushed["pushed"] == 0
    assert "not blessed" in pushed["push_message"] and "binary_accuracy" in pushed["push_message"]
    assert sorted(os.listdir(taxi["serving"])) == [".push.lock", "1"]  # the Pusher's lock file


# -- value threshold failure on next-day data -------------------------------------------------------------
def test_next_day_examples_and_value_threshold_failure_names_metric_and_slice(worse):
    result, _ = worse
    day = result.artifact("NextDayExampleGen", "examples")
    assert day.properties["row_counts"] == {"day": NEXT_DAY_ROWS}
    # Typed INT by its own ExampleGen, FLOAT in the training schema: the Evaluator cast it back.
    parquet = sorted(glob.glob(os.path.join(day.uri, "Split-day", "*.parquet")))[0]
    assert pq.read_schema(parquet).field("trip_miles").type == pa.large_list(pa.int64())
    evaluation = result.artifact("NextDayEvaluator", "evaluation")
    loaded = tfma.load_eval_result(evaluation.uri)
    assert dict(loaded.slicing_metrics)[()][""][""]["example_count"]["doubleValue"] == NEXT_DAY_ROWS
    assert evaluation.properties["evaluated_on"] == f"{day.uri} split day"
    blessing = result.artifact("NextDayEvaluator", "blessing")
    assert blessing.properties["blessed"] == 0
    report = json.loads(_read(os.path.join(blessing.uri, ev.VALIDATION_FILE)))

    # Every slice below the bound is named, and only those.
    below = {
        tfma.slicer.stringify_slice_key(key)
        for key, metrics in loaded.slicing_metrics
        if metrics[""][""]["binary_accuracy"]["doubleValue"] < NEXT_DAY_BOUND
    }
    assert {r["slice"] for r in report["reasons"]} == below
    assert "Overall" in below and len(below) > 1
    overall = next(r for r in report["reasons"] if r["slice"] == "Overall")
    print(f"weak model, next day: binary_accuracy {overall['value']:.4f}; {len(below)} slice(s) below the bound")
    assert overall["metric"] == "binary_accuracy" and overall["value"] < NEXT_DAY_BOUND - 0.1
    assert overall["threshold"] == {"valueThreshold": {"lowerBound": NEXT_DAY_BOUND}}
    assert overall["message"] == f"binary_accuracy on slice Overall: {overall['value']:.4g}; required >= 0.8"
    assert overall["message"] in _read(os.path.join(blessing.uri, ev.NOT_BLESSED_FILE))


# -- baseline resolution against the real store -------------------------------------------------------------
def test_resolve_finds_the_model_of_the_latest_blessing(taxi, first, worse):
    components = {c.id: c for c in _pipeline(taxi["data"], taxi["serving"], GOOD_STEPS)}
    evaluator = components["Evaluator"]
    store = store_at(taxi["root"])
    # The weak model's blessing is newer but not blessed: the baseline is still the first model.
    [baseline] = evaluator.resolve(store, "taxi").values()
    expected = first.artifact("Trainer", "model")
    assert (baseline.type.name, baseline.uri, baseline.id) == (MODEL.name, expected.uri, expected.id)
    assert evaluator.resolve(store, "another_pipeline") == {}
    # Only this Evaluator's own blessings count: UnjudgedEvaluator never blessed anything.
    other = ev.Evaluator(
        examples=components["ExampleGen"].outputs.examples,
        model=components["Trainer"].outputs.model,
        eval_config=BLESS_CONFIG,
        component_id="UnjudgedEvaluator",
    )
    assert other.resolve(store, "taxi") == {}
    value_only = ev.Evaluator(
        examples=components["ExampleGen"].outputs.examples,
        model=components["Trainer"].outputs.model,
        eval_config=NEXT_DAY_CONFIG,
    )
    assert value_only.resolve(store, "taxi") == {}  # no change thresholds: no baseline needed


class _OrphanStore:
    """A store whose latest blessing names a model it does not list (a corrupted or pruned store)."""

    def latest_artifacts(self, type_name, pipeline_name, properties=None):
        if type_name == MODEL_BLESSING.name:
            return [Artifact(MODEL_BLESSING, "/b/1", {"blessed": 1, "model_uri": "/gone"}, id=1)]
        return []


def test_resolve_rejects_a_blessing_of_an_unknown_model():
    evaluator = _pipeline(TAXI_CSV, "/serving", GOOD_STEPS)[-2]
    with pytest.raises(MetadataError, match="/gone"):
        evaluator.resolve(_OrphanStore(), "p")


# -- compile-time checks, in a real pipeline ------------------------------------------------------------
def _compile_with(taxi, **evaluator_params):
    components = taxi_trainer_components(taxi["data"], train_steps=GOOD_STEPS)
    gen, trainer = components[0], components[-1]
    evaluator = ev.Evaluator(
        examples=gen.outputs.examples, model=trainer.outputs.model, eval_config=BLESS_CONFIG, **evaluator_params
    )
    return run_components(taxi["root"], [*components, evaluator], name="taxi")


def test_unknown_example_split_fails_before_anything_runs(taxi, first):
    with pytest.raises(PipelineDefinitionError, match="'test' is not one of the splits"):
        _compile_with(taxi, example_split="test")


def test_next_day_examples_must_have_the_columns_the_schema_names(taxi, first, tmp_path):
    data = taxi_sample(str(tmp_path / "no_hour.csv"), 50, drop_columns=("trip_start_hour",))
    components = taxi_trainer_components(taxi["data"], train_steps=GOOD_STEPS)  # all cached from `first`
    day = ExampleGen(input_base=data, splits={"day": 1}, component_id="NoHourExampleGen")
    evaluator = ev.Evaluator(
        examples=day.outputs.examples,
        model=components[-1].outputs.model,
        schema=_schema_gen(components).outputs.schema,
        eval_config=BLESS_CONFIG,
        example_split="day",
        component_id="NoHourEvaluator",
    )
    with pytest.raises(InputDataError, match=r"split day: missing columns \['trip_start_hour'\], which the schema"):
        run_components(taxi["root"], [*components, day, evaluator], name="taxi")
    store = store_at(taxi["root"])
    assert not store.latest_artifacts(MODEL_BLESSING.name, "taxi", {"producer_component": "NoHourEvaluator"})


# -- config parsing and threshold helpers (no model needed) -------------------------------------------------
def _channels():
    components = taxi_trainer_components(TAXI_CSV)
    return components[0].outputs.examples, components[-1].outputs.model


def test_eval_config_is_accepted_as_proto_json_or_dict():
    config = _config(lower_bounds={"auc": 0.5})
    assert ev.parse_eval_config(json_format.MessageToJson(config)) == config
    examples, model = _channels()
    a = ev.Evaluator(examples=examples, model=model, eval_config=config)
    b = ev.Evaluator(examples=examples, model=model, eval_config=a.params["eval_config"])
    assert a.eval_config == b.eval_config
    assert a.eval_config.model_specs[0].model_type == tfma.TF_GENERIC
    assert a.has_value_thresholds and not a.has_change_thresholds
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
    examples, model = _channels()
    with pytest.raises(PipelineDefinitionError, match=message):
        ev.Evaluator(examples=examples, model=model, eval_config=config)


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


def test_serialized_examples_leave_missing_values_absent():
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array([[], [1.5], None], pa.large_list(pa.float32())),  # row 0: an empty list, row 2: null
            pa.array([[0], [1], [1]], pa.large_list(pa.int64())),
        ],
        names=["x", "label"],
    )
    fn = evaluate_model._AddSerializedExamples()
    fn.setup()
    [out] = list(fn.process(batch))
    assert out.schema.names == [*batch.schema.names, tfma.ARROW_INPUT_COLUMN]
    raw = out.column(out.schema.names.index(tfma.ARROW_INPUT_COLUMN)).to_pylist()
    first, second, third = (tf.train.Example.FromString(r[0]) for r in raw)
    # A feature without a value list: parse_example treats it as missing and applies the default.
    assert first.features.feature["x"].WhichOneof("kind") is None
    assert third.features.feature["x"].WhichOneof("kind") is None
    assert first.features.feature["label"].int64_list.value == [0]
    assert second.features.feature["x"].float_list.value[0] == pytest.approx(1.5)
