"""Stores with real runs in them, for the query, lineage and report tests.

The data half is the real taxi pipeline (launcher + ML Metadata) on a slice of the sample. The model
half (Trainer, Evaluator, Pusher) is recorded through the store API exactly as the launcher records
a component, with real files behind each artifact: a tiny Keras SavedModel at `Format-Serving`,
TensorBoard logs from its training, a TFMA evaluation sliced by trip_start_hour, a blessing and a
pushed copy of the model.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import shutil
import textwrap

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import Pipeline, launcher
from beam_pipeline.artifacts import MODEL, MODEL_BLESSING, MODEL_EVALUATION, MODEL_RUN, PUSHED_MODEL, Artifact
from beam_pipeline.metadata import MetadataStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_CSV = os.path.join(ROOT, "examples", "chicago_taxi", "data", "data.csv")
TAXI_PIPELINE = os.path.join(ROOT, "examples", "chicago_taxi", "pipeline.py")
FEATURES = ("fare", "trip_miles", "trip_start_hour")
SLICE = "trip_start_hour"


def sample_csv(path: str, rows: int, skip: int = 0) -> str:
    """The header and `rows` taxi rows starting after `skip` data rows."""
    with open(TAXI_CSV) as src, open(path, "w") as dst:
        dst.write(src.readline())
        for i, line in enumerate(src):
            if i >= skip + rows:
                break
            if i >= skip:
                dst.write(line)
    return path


def taxi_pipeline(root: str, data_path: str):
    """The example's data-half pipeline, reading `data_path` instead of the full sample."""
    spec = importlib.util.spec_from_file_location("_fixture_taxi_pipeline", TAXI_PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return data_half(module.create_pipeline(pipeline_root=root, data_path=data_path))


def data_half(pipeline: Pipeline) -> Pipeline:
    """The example pipeline's first four components (ExampleGen … ExampleValidator)."""
    return Pipeline(pipeline.name, pipeline.root, pipeline.components[:4])


def pipeline_file(path: str, root: str, data_path: str) -> str:
    """A pipeline file for `beam-pipeline run` that runs the example's pipeline on `data_path`."""
    with open(path, "w") as f:
        f.write(
            textwrap.dedent(
                f"""
                import importlib.util

                from beam_pipeline import Pipeline

                spec = importlib.util.spec_from_file_location("taxi", {TAXI_PIPELINE!r})
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)


                def create_pipeline(pipeline_root={root!r}):
                    full = module.create_pipeline(pipeline_root=pipeline_root, data_path={data_path!r})
                    return Pipeline(full.name, full.root, full.components[:4])  # the data half
                """
            )
        )
    return path


def run_data_half(root: str, data_path: str, metadata_uri: str | None = None) -> launcher.RunResult:
    return launcher.run(taxi_pipeline(root, data_path), ["--direct_num_workers=1"], metadata_uri=metadata_uri)


def _columns(examples_uri: str, split: str) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*.parquet"))))

    def column(name: str) -> np.ndarray:
        return np.array([v[0] if v else np.nan for v in table.column(name).to_pylist()], dtype="float64")

    cols = {name: np.nan_to_num(column(name)) for name in (*FEATURES, "tips")}
    cols["big_tip"] = (cols["tips"] > 0.2 * cols["fare"]).astype("int64")
    return cols


def _train(examples_uri: str, model_uri: str, logs_uri: str, train_steps: int, seed: int):
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    cols = _columns(examples_uri, "train")
    x = np.stack([cols[f] for f in FEATURES], axis=1)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Normalization(axis=-1),
            tf.keras.layers.Dense(4, activation="relu"),
            tf.keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.layers[0].adapt(x)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(
        x,
        cols["big_tip"],
        epochs=2,
        steps_per_epoch=max(1, train_steps // 2),
        batch_size=32,
        verbose=0,
        callbacks=[tf.keras.callbacks.TensorBoard(log_dir=logs_uri)],
    )
    model.save(os.path.join(model_uri, "Format-Serving"))
    return model


def _evaluate(model, examples_uri: str, evaluation_uri: str, work_dir: str) -> None:
    """TFMA on predictions the model made for the eval split, sliced overall and by trip_start_hour."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_analysis as tfma

    cols = _columns(examples_uri, "eval")
    predictions = model.predict(np.stack([cols[f] for f in FEATURES], axis=1), verbose=0)[:, 0]
    data = os.path.join(work_dir, "eval_predictions.tfrecord")
    with tf.io.TFRecordWriter(data) as writer:
        for hour, label, prediction in zip(cols[SLICE], cols["big_tip"], predictions, strict=True):
            example = tf.train.Example()
            example.features.feature[SLICE].int64_list.value.append(int(hour))
            example.features.feature["big_tip"].int64_list.value.append(int(label))
            example.features.feature["prediction"].float_list.value.append(float(prediction))
            writer.write(example.SerializeToString())
    config = tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(label_key="big_tip", prediction_key="prediction")],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[SLICE])],
        metrics_specs=[
            tfma.MetricsSpec(
                metrics=[
                    tfma.MetricConfig(class_name=n)
                    for n in ("ExampleCount", "BinaryAccuracy", "AUC", "CalibrationPlot")
                ]
            )
        ],
    )
    tfma.run_model_analysis(eval_config=config, data_location=data, output_path=evaluation_uri)


def add_model_half(
    store: MetadataStore,
    result: launcher.RunResult,
    work_dir: str,
    *,
    module_text: str,
    train_steps: int,
    seed: int,
    push_to: str,
) -> dict[str, int]:
    """Record Trainer -> Evaluator -> Pusher in the run's contexts, with real files; returns artifact ids."""
    import time

    contexts = store.run_contexts(result.pipeline_name, result.run_id)
    examples = result.artifact("ExampleGen", "examples")
    schema = result.artifact("SchemaGen", "schema")
    module_file = os.path.join(work_dir, "taxi_trainer.py")
    with open(module_file, "w") as f:
        f.write(module_text)
    props = {"pipeline_name": result.pipeline_name}

    began = int(time.time() * 1000)
    trainer_config = {"module_file": module_file, "train_steps": train_steps, "warm_start": False}
    trainer_id = store.start_execution(
        "Trainer",
        "Trainer",
        pipeline_name=result.pipeline_name,
        run_id=result.run_id,
        config=trainer_config,
        cache_key="",
        contexts=contexts,
    )
    model_uri = os.path.join(result.pipeline_root, "Trainer", "model", str(trainer_id))
    logs_uri = os.path.join(result.pipeline_root, "Trainer", "model_run", str(trainer_id))
    model = _train(examples.uri, model_uri, logs_uri, train_steps, seed)
    os.makedirs(os.path.join(model_uri, "module"), exist_ok=True)
    shutil.copy(module_file, os.path.join(model_uri, "module", "taxi_trainer.py"))
    model_artifact = Artifact(MODEL, model_uri, {**props, "producer_component": "Trainer"})
    run_artifact = Artifact(MODEL_RUN, logs_uri, {**props, "producer_component": "Trainer"})
    store.finish_execution(
        trainer_id,
        state=mlmd_pb2.Execution.COMPLETE,
        inputs={"examples": [examples], "schema": [schema]},
        outputs={"model": model_artifact, "model_run": run_artifact},
        contexts=contexts,
        start_time_ms=began,
    )

    began = int(time.time() * 1000)
    evaluator_id = store.start_execution(
        "Evaluator",
        "Evaluator",
        pipeline_name=result.pipeline_name,
        run_id=result.run_id,
        config={"slice_features": [SLICE]},
        cache_key="",
        contexts=contexts,
    )
    evaluation_uri = os.path.join(result.pipeline_root, "Evaluator", "evaluation", str(evaluator_id))
    blessing_uri = os.path.join(result.pipeline_root, "Evaluator", "blessing", str(evaluator_id))
    _evaluate(model, examples.uri, evaluation_uri, work_dir)
    os.makedirs(blessing_uri, exist_ok=True)
    open(os.path.join(blessing_uri, "BLESSED"), "w").close()
    evaluation = Artifact(MODEL_EVALUATION, evaluation_uri, {**props, "producer_component": "Evaluator"})
    blessing = Artifact(
        MODEL_BLESSING, blessing_uri, {**props, "producer_component": "Evaluator", "blessed": 1, "model_uri": model_uri}
    )
    store.finish_execution(
        evaluator_id,
        state=mlmd_pb2.Execution.COMPLETE,
        inputs={"examples": [examples], "model": [model_artifact]},
        outputs={"evaluation": evaluation, "blessing": blessing},
        contexts=contexts,
        start_time_ms=began,
    )

    began = int(time.time() * 1000)
    pusher_id = store.start_execution(
        "Pusher",
        "Pusher",
        pipeline_name=result.pipeline_name,
        run_id=result.run_id,
        config={"serving_model_dir": push_to},
        cache_key="",
        contexts=contexts,
    )
    version = str(len(os.listdir(push_to)) + 1 if os.path.isdir(push_to) else 1)
    destination = os.path.join(push_to, version)
    shutil.copytree(os.path.join(model_uri, "Format-Serving"), destination)
    pushed_uri = os.path.join(result.pipeline_root, "Pusher", "pushed_model", str(pusher_id))
    os.makedirs(pushed_uri, exist_ok=True)
    pushed = Artifact(
        PUSHED_MODEL,
        pushed_uri,
        {
            **props,
            "producer_component": "Pusher",
            "pushed": 1,
            "pushed_destination": destination,
            "pushed_version": version,
        },
    )
    store.finish_execution(
        pusher_id,
        state=mlmd_pb2.Execution.COMPLETE,
        inputs={"model": [model_artifact], "blessing": [blessing]},
        outputs={"pushed_model": pushed},
        contexts=contexts,
        start_time_ms=began,
    )
    return {
        "model": model_artifact.id,
        "model_run": run_artifact.id,
        "evaluation": evaluation.id,
        "blessing": blessing.id,
        "pushed_model": pushed.id,
        "examples": examples.id,
        "schema": schema.id,
        "trainer_execution": trainer_id,
    }


MODULE_A = "def run_fn(fn_args):\n    hidden_units = 4\n    return hidden_units\n"
MODULE_B = "def run_fn(fn_args):\n    hidden_units = 8\n    dropout = 0.1\n    return hidden_units\n"


def build_model_store(base: str) -> dict:
    """Two runs in one store, each trained on a different slice of the data with different code and steps,
    and a third run that only re-ran the data half from cache.
    """
    root = os.path.join(base, "root")
    store_path = os.path.join(root, "metadata.sqlite")
    work_a, work_b = os.path.join(base, "work_a"), os.path.join(base, "work_b")
    os.makedirs(work_a)
    os.makedirs(work_b)
    csv_a = sample_csv(os.path.join(work_a, "data.csv"), rows=600)
    csv_b = sample_csv(os.path.join(work_b, "data.csv"), rows=500, skip=3000)
    run_a = run_data_half(root, csv_a)
    store = MetadataStore(store_path)
    ids_a = add_model_half(
        store, run_a, work_a, module_text=MODULE_A, train_steps=10, seed=1, push_to=os.path.join(base, "serving")
    )
    run_b = run_data_half(root, csv_b)
    ids_b = add_model_half(
        store, run_b, work_b, module_text=MODULE_B, train_steps=20, seed=2, push_to=os.path.join(base, "serving")
    )
    run_c = run_data_half(root, csv_a)
    return {
        "root": root,
        "store": store_path,
        "pipeline": run_a.pipeline_name,
        "runs": [run_a.run_id, run_b.run_id, run_c.run_id],
        "a": ids_a,
        "b": ids_b,
        "module_paths": [os.path.join(work_a, "taxi_trainer.py"), os.path.join(work_b, "taxi_trainer.py")],
    }


@functools.cache
def shared_model_store(base: str) -> dict:
    """build_model_store once per test session, however many test modules ask for it."""
    return build_model_store(base)
