"""Trainer component in real pipelines: ExampleGen → ... → Transform → Trainer on a few hundred taxi rows.

Every test trains in one shared pipeline root, so ExampleGen, SchemaGen and Transform are reused from
the cache after the first run and each Trainer variant costs only its own training.
"""

from __future__ import annotations

import glob
import math
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import pyarrow as pa
import pytest
from tensorflow_metadata.proto.v0 import schema_pb2

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import MODEL
from beam_pipeline.errors import PipelineDefinitionError, UserModuleError
from runners import training
from tests.helpers import run_components, store_at
from tests.test_transform import TAXI_MODULE, channels, taxi_components, taxi_sample, write_module
from transforms.trainer import SERVING_DIR, Trainer
from transforms.transform import Transform


def taxi_trainer_components(data: str, *, transform_params: dict | None = None, **trainer_params) -> list:
    """A fresh definition of the taxi pipeline up to the Trainer (20 steps unless told otherwise)."""
    components = taxi_components(data, **(transform_params or {}))
    schema, transform = components[-2], components[-1]
    params = {"module_file": TAXI_MODULE, "train_steps": 20, "eval_steps": 5, **trainer_params}
    trainer = Trainer(
        examples=transform.outputs.transformed_examples,
        transform_graph=transform.outputs.transform_graph,
        schema=schema.outputs.schema,
        **params,
    )
    return [*components, trainer]


@pytest.fixture(scope="module")
def taxi_root(tmp_path_factory):
    """The shared pipeline root and the 300-row CSV its ExampleGen reads."""
    tmp = tmp_path_factory.mktemp("trainer")
    return tmp / "root", taxi_sample(str(tmp / "taxi.csv"))


def run_trainer(taxi_root, **trainer_params):
    root, data = taxi_root
    return run_components(root, taxi_trainer_components(data, **trainer_params), name="taxi")


@pytest.fixture(scope="module")
def trained(taxi_root):
    """The first run: the whole pipeline, a model trained with the defaults."""
    return run_trainer(taxi_root)


def trainer_channels() -> tuple:
    examples, schema = channels()
    transform = Transform(examples=examples, schema=schema, module_file=TAXI_MODULE)
    return transform.outputs.transformed_examples, transform.outputs.transform_graph, schema


def raw_requests(batch: pa.RecordBatch) -> tuple[dict[str, np.ndarray], list[bytes]]:
    """The same raw rows as serving_default inputs (missing → NaN / -1 / "") and as tf.Examples."""
    import tensorflow as tf

    dense: dict[str, np.ndarray] = {}
    examples = [tf.train.Example() for _ in range(batch.num_rows)]
    for name in batch.schema.names:
        if name == "tips":
            continue
        values = batch.column(name).to_pylist()
        kind = batch.schema.field(name).type.value_type
        if kind == "int64":
            dense[name] = np.array([v[0] if v else -1 for v in values], np.int64)
        elif kind == "float":
            dense[name] = np.array([v[0] if v else np.nan for v in values], np.float32)
        else:
            dense[name] = np.array([v[0] if v else b"" for v in values], object)
        for example, v in zip(examples, values, strict=True):
            if not v:
                continue
            feature = example.features.feature[name]
            if kind == "int64":
                feature.int64_list.value.append(v[0])
            elif kind == "float":
                feature.float_list.value.append(v[0])
            else:
                feature.bytes_list.value.append(v[0])
    return dense, [e.SerializeToString() for e in examples]


def split_rows(result, split: str) -> pa.RecordBatch:
    """The raw rows of one split as ExampleGen wrote them."""
    examples = result.artifact("ExampleGen", "examples")
    batches = artifact_io.read_parquet_batches(artifact_io.join(examples.split_uri(split), "*.parquet"))
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def model_weights(serving_dir: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(serving_dir, "variables", "variables"))
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k.startswith("layer_with_weights-") and k.endswith("VARIABLE_VALUE")
    }


def weights_of(result) -> dict[str, np.ndarray]:
    return model_weights(os.path.join(result.artifact("Trainer", "model").uri, SERVING_DIR))


def test_trainer_exports_servable_model(trained):
    import tensorflow as tf

    serving_dir = os.path.join(trained.artifact("Trainer", "model").uri, SERVING_DIR)
    assert glob.glob(os.path.join(trained.artifact("Trainer", "model_run").uri, "train", "events.out.tfevents.*"))
    assert trained.artifact("Trainer", "model_run").properties["num_replicas"] == 1

    model = tf.saved_model.load(serving_dir)
    assert set(model.signatures) == {"serving_default", "from_examples", "transform_features"}
    serving = model.signatures["serving_default"]
    specs = serving.structured_input_signature[1]
    assert "tips" not in specs and len(specs) == 17
    assert {n: s.dtype.name for n, s in specs.items() if n in ("fare", "trip_start_hour", "company")} == {
        "fare": "float32",
        "trip_start_hour": "int64",
        "company": "string",
    }
    assert all(s.shape.as_list() == [None] for s in specs.values())

    rows = split_rows(trained, "train")
    dense, serialized = raw_requests(rows)
    assert np.isnan(dense["pickup_latitude"]).any(), "the sample should exercise missing values"
    scores = serving(**{k: tf.constant(v) for k, v in dense.items()})["scores"].numpy()
    assert scores.shape == (rows.num_rows, 1) and ((scores >= 0) & (scores <= 1)).all()
    from_examples = model.signatures["from_examples"](examples=tf.constant(serialized))["scores"].numpy()
    np.testing.assert_allclose(scores, from_examples, rtol=1e-5)

    features = model.signatures["transform_features"](examples=tf.constant(serialized))
    assert "tips_xf" in features and features["fare_xf"].shape == (rows.num_rows, 1)


def test_training_is_deterministic(taxi_root, trained):
    """The whole pipeline again without the cache (new examples, transform graph and training): the
    seeded taxi module gives the same weights bit for bit; another seed gives other weights."""
    root, data = taxi_root
    again = run_components(root, taxi_trainer_components(data), name="taxi", enable_cache=False)
    assert again.components["Transform"].state == "COMPLETE"
    assert again.artifact("Trainer", "model").uri != trained.artifact("Trainer", "model").uri
    first, second = weights_of(trained), weights_of(again)
    assert first.keys() == second.keys() and len(first) > 5
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)

    other = weights_of(run_trainer(taxi_root, hyperparameters={"seed": 1}))
    assert any(not np.array_equal(first[name], other[name]) for name in first)


def test_warm_start_starts_from_the_latest_model(taxi_root, trained):
    root, data = taxi_root
    store = store_at(root)
    base = store.latest_artifacts(MODEL.name, "taxi", {"producer_component": "Trainer"})[0]
    trainer = taxi_trainer_components(data, warm_start=True)[-1]
    assert trainer.resolve(store, "taxi") == {"warm_start_model": base}

    # With a zero learning rate the warm-started weights must come out exactly as they went in.
    frozen = {"learning_rate": 0.0}
    warm = run_trainer(taxi_root, warm_start=True, hyperparameters=frozen)
    assert warm.artifact("Trainer", "model").properties["warm_started_from"] == os.path.join(base.uri, SERVING_DIR)
    cold = run_trainer(taxi_root, hyperparameters=frozen)
    assert "warm_started_from" not in cold.artifact("Trainer", "model").properties
    base_w = model_weights(os.path.join(base.uri, SERVING_DIR))
    warm_w, cold_w = weights_of(warm), weights_of(cold)
    assert base_w.keys() == warm_w.keys() and len(base_w) > 5
    for k in base_w:
        np.testing.assert_array_equal(base_w[k], warm_w[k])
    assert any(not np.array_equal(base_w[k], cold_w[k]) for k in base_w)


def test_no_warm_start_without_previous_model(tmp_path):
    trainer = taxi_trainer_components(taxi_sample(str(tmp_path / "taxi.csv")), warm_start=True)[-1]
    assert trainer.resolve(store_at(tmp_path), "taxi") == {}


def test_mirrored_strategy_on_two_logical_cpus(taxi_root):
    result = run_trainer(taxi_root, strategy="mirrored", cpu_devices=2)
    properties = result.artifact("Trainer", "model_run").properties
    assert (properties["strategy"], properties["num_replicas"]) == ("mirrored", 2)
    assert os.path.exists(os.path.join(result.artifact("Trainer", "model").uri, SERVING_DIR, "saved_model.pb"))


def test_module_without_run_fn(tmp_path):
    module = write_module(str(tmp_path), "def preprocessing_fn(inputs):\n    return inputs\n")
    examples, graph, _ = trainer_channels()
    with pytest.raises(UserModuleError, match=r"user_module\.py does not define a function run_fn"):
        Trainer(examples=examples, transform_graph=graph, module_file=module)


def test_run_fn_raising_names_module_and_error(taxi_root, trained, tmp_path):
    module = write_module(str(tmp_path), "def run_fn(fn_args):\n    raise KeyError('hidden_units')\n")
    with pytest.raises(UserModuleError, match=r"run_fn in .*user_module\.py raised KeyError: 'hidden_units'"):
        run_trainer(taxi_root, module_file=module)


def test_run_fn_that_exports_nothing(taxi_root, trained, tmp_path):
    module = write_module(str(tmp_path), "def run_fn(fn_args):\n    pass\n")
    with pytest.raises(UserModuleError, match="returned without exporting a SavedModel"):
        run_trainer(taxi_root, module_file=module)


def test_unmaterialized_examples_rejected_at_compile_time(taxi_root):
    with pytest.raises(PipelineDefinitionError, match="materialize"):
        run_trainer(taxi_root, transform_params={"materialize": False})


@pytest.mark.parametrize(
    "strategy, cpu_devices, message",
    [("tpu", None, "expected one of"), ("default", 2, "only meaningful"), ("mirrored", 0, "positive integer")],
)
def test_bad_strategy_configuration(strategy, cpu_devices, message):
    with pytest.raises(PipelineDefinitionError, match=message):
        training.validate(strategy, cpu_devices)


def _fn_args(trained):
    from transforms._fn_args import FnArgs

    examples = trained.artifact("Transform", "transformed_examples")
    return FnArgs(
        train_files=[os.path.join(examples.split_uri("train"), "*.gz")],
        eval_files=[],
        transform_output=trained.artifact("Transform", "transform_graph").uri,
        serving_model_dir="",
        model_run_dir="",
        train_steps=1,
        eval_steps=1,
        schema=schema_pb2.Schema(),
    )


def test_fn_args_dataset_yields_transformed_batches(trained):
    fn_args = _fn_args(trained)
    features, label = next(iter(fn_args.make_dataset(fn_args.train_files, 8, "tips_xf")))
    assert label.shape == (8, 1) and "tips_xf" not in features
    assert math.isfinite(float(features["fare_xf"].numpy().sum()))


def test_fn_args_dataset_with_a_seed_repeats_its_order(trained):
    fn_args = _fn_args(trained)

    def fares(seed: int) -> np.ndarray:
        batches = fn_args.make_dataset(fn_args.train_files, 16, "tips_xf", seed=seed).take(6)
        return np.concatenate([features["fare_xf"].numpy() for features, _ in batches])

    first = fares(7)
    np.testing.assert_array_equal(first, fares(7))
    assert not np.array_equal(first, fares(8))


def served_auc(serving_dir: str, batches: list[pa.RecordBatch]) -> float:
    """ROC AUC of serving_default's scores on raw rows; labels computed from fare and tips in float32."""
    import tensorflow as tf

    serve = tf.saved_model.load(serving_dir).signatures["serving_default"]
    auc = tf.keras.metrics.AUC(num_thresholds=2000)
    for batch in batches:
        dense, _ = raw_requests(batch)
        scores = serve(**{k: tf.constant(v) for k, v in dense.items()})["scores"]
        fare = np.array([v[0] if v else np.nan for v in batch.column("fare").to_pylist()], np.float32)
        tips = np.array([v[0] if v else 0 for v in batch.column("tips").to_pylist()], np.float32)
        labels = (~np.isnan(fare)) & (tips > np.float32(0.2) * np.nan_to_num(fare))
        auc.update_state(labels.astype(np.float32)[:, None], scores)
    return float(auc.result())


TAXI_DEMO_STEPS = 200  # AUC on the 5,087 eval rows: 25 steps 0.92, 50 steps 0.94, 200 steps 0.95


@pytest.mark.slow
def test_taxi_pipeline_trains_a_good_model_and_warm_starts(tmp_path, taxi_csv):
    """ExampleGen → StatisticsGen → SchemaGen → Transform → Trainer on the full sample, then warm start."""
    from beam_pipeline import artifact_io
    from tests.helpers import run_components
    from transforms.example_gen import ExampleGen
    from transforms.schema_gen import SchemaGen
    from transforms.statistics_gen import StatisticsGen

    def components(**trainer_params):
        gen = ExampleGen(input_base=taxi_csv)
        stats = StatisticsGen(examples=gen.outputs.examples)
        schema = SchemaGen(statistics=stats.outputs.statistics)
        transform = Transform(examples=gen.outputs.examples, schema=schema.outputs.schema, module_file=TAXI_MODULE)
        trainer = Trainer(
            examples=transform.outputs.transformed_examples,
            transform_graph=transform.outputs.transform_graph,
            schema=schema.outputs.schema,
            module_file=TAXI_MODULE,
            **trainer_params,
        )
        return [gen, stats, schema, transform, trainer]

    first = run_components(tmp_path, components(train_steps=TAXI_DEMO_STEPS, eval_steps=50), name="taxi")
    model = first.artifact("Trainer", "model")
    examples = first.artifact("ExampleGen", "examples")
    eval_rows = artifact_io.read_parquet_batches(artifact_io.join(examples.split_uri("eval"), "*.parquet"))
    auc = served_auc(os.path.join(model.uri, SERVING_DIR), eval_rows)
    print(f"taxi eval AUC after {TAXI_DEMO_STEPS} steps: {auc:.4f}")
    assert auc >= 0.85

    second = run_components(tmp_path, components(train_steps=100, eval_steps=50, warm_start=True), name="taxi")
    assert second.components["Transform"].state == "CACHED"
    warm = second.artifact("Trainer", "model")
    assert warm.uri != model.uri
    assert warm.properties["warm_started_from"] == os.path.join(model.uri, SERVING_DIR)
    assert served_auc(os.path.join(warm.uri, SERVING_DIR), eval_rows) >= 0.85


def strategy_summary(name: str) -> tuple[bool, int, str]:
    """Runs in a fresh process: whether TF_CONFIG gave a multi-worker strategy, and for which task."""
    import tensorflow as tf

    strategy = training.make_strategy(name)
    resolver = strategy.cluster_resolver
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    return multi_worker, strategy.num_replicas_in_sync, f"{resolver.task_type}:{resolver.task_id}"


def test_multi_worker_strategy_reads_tf_config(monkeypatch):
    import json
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cluster = {"cluster": {"worker": [f"localhost:{port}"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    assert training.needs_fresh_process("multi_worker_mirrored", None)
    summary = training.run_in_fresh_process(strategy_summary, "multi_worker_mirrored")
    assert summary == (True, 1, "worker:0")
