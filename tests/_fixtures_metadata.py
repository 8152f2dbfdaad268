"""Stores filled by real runs of the example taxi pipeline, for the query, lineage, diff and report tests.

Every record comes from `launcher.run` on small slices of the taxi sample: ExampleGen through Pusher,
with the artifacts, events and files the real components write. `build_model_store` runs it twice
with different data, train steps and user code, then re-runs the data half from cache. Only the
Evaluator's thresholds differ from the example's (see `overall_eval_config`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import textwrap

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from beam_pipeline import Pipeline, launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_DIR = os.path.join(ROOT, "examples", "chicago_taxi")
TAXI_CSV = os.path.join(TAXI_DIR, "data", "data.csv")
TAXI_PIPELINE = os.path.join(TAXI_DIR, "pipeline.py")
TAXI_MODULE = os.path.join(TAXI_DIR, "taxi_utils.py")
SLICE = "trip_start_hour"
LABEL_KEY = "tips_xf"
AUC_LOWER_BOUND = 0.8
AUC_MAX_REGRESSION = 0.2
BEAM_ARGS = ["--direct_num_workers=1"]

# Run B's module differs from the example's in one hyperparameter line: the diff tests look for it.
MODULE_A_LINE = '    "hidden_units": [64, 32],\n'
MODULE_B_LINE = '    "hidden_units": [32, 16],\n'
TRAIN_STEPS = (60, 90)  # runs A and B


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


def _example_module():
    spec = importlib.util.spec_from_file_location("_fixture_taxi_pipeline", TAXI_PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overall_eval_config():
    """The example's metrics and slices, with its AUC bound and regression limit judged on the overall slice.

    The example bounds every hour slice; on a few hundred eval rows a slice has 2-40 of them, often of
    one class (AUC 0), so those bounds would fail by chance. Small-data models score about 0.94
    overall: the bound and the limit hold with a wide margin, so run A is blessed and run B, judged
    against A as its baseline, is too.
    """
    import tensorflow_model_analysis as tfma

    from transforms.evaluator import binary_classification_eval_config

    config = binary_classification_eval_config(LABEL_KEY, slice_features=[SLICE])
    auc = next(m for m in config.metrics_specs[0].metrics if m.class_name == "AUC" and not m.config)
    overall = auc.per_slice_thresholds.add()
    overall.slicing_specs.add()
    overall.threshold.value_threshold.lower_bound.value = AUC_LOWER_BOUND
    overall.threshold.change_threshold.direction = tfma.MetricDirection.HIGHER_IS_BETTER
    overall.threshold.change_threshold.absolute.value = -AUC_MAX_REGRESSION
    return config


def full_pipeline(root: str, data_path: str, *, module_file: str, train_steps: int, serving_model_dir: str) -> Pipeline:
    """The example's whole pipeline on `data_path` with the given user module, judged by `overall_eval_config`."""
    from transforms.evaluator import Evaluator
    from transforms.pusher import Pusher

    example = _example_module().create_pipeline(
        pipeline_root=root,
        data_path=data_path,
        train_steps=train_steps,
        serving_model_dir=serving_model_dir,
        module_file=module_file,
    )
    *upstream, evaluator, pusher = example.components
    gen, trainer = upstream[0], upstream[-1]
    if [c.id for c in (gen, trainer, evaluator, pusher)] != ["ExampleGen", "Trainer", "Evaluator", "Pusher"]:
        raise AssertionError(f"{TAXI_PIPELINE} changed its components: {[c.id for c in example.components]}")
    evaluator = Evaluator(examples=gen.outputs.examples, model=trainer.outputs.model, eval_config=overall_eval_config())
    pusher = Pusher(
        model=trainer.outputs.model, blessing=evaluator.outputs.blessing, serving_model_dir=serving_model_dir
    )
    return Pipeline(example.name, example.root, [*upstream, evaluator, pusher])


def taxi_pipeline(root: str, data_path: str) -> Pipeline:
    """The example's data-half pipeline, reading `data_path` instead of the full sample."""
    return data_half(_example_module().create_pipeline(pipeline_root=root, data_path=data_path))


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
    return launcher.run(taxi_pipeline(root, data_path), BEAM_ARGS, metadata_uri=metadata_uri)


def write_module(path: str, replace: tuple[str, str] | None = None) -> str:
    """A copy of the example's user module at `path`, with one line replaced if asked."""
    with open(TAXI_MODULE) as f:
        text = f.read()
    if replace:
        if replace[0] not in text:
            raise AssertionError(f"{TAXI_MODULE} no longer has the line {replace[0]!r} the fixture edits")
        text = text.replace(replace[0], replace[1])
    with open(path, "w") as f:
        f.write(text)
    return path


def _ids(result: launcher.RunResult) -> dict[str, int]:
    """The artifact and execution ids of one full run, by the names the tests use."""
    outputs = {
        "examples": ("ExampleGen", "examples"),
        "statistics": ("StatisticsGen", "statistics"),
        "schema": ("SchemaGen", "schema"),
        "transform_graph": ("Transform", "transform_graph"),
        "transformed_examples": ("Transform", "transformed_examples"),
        "model": ("Trainer", "model"),
        "model_run": ("Trainer", "model_run"),
        "evaluation": ("Evaluator", "evaluation"),
        "blessing": ("Evaluator", "blessing"),
        "pushed_model": ("Pusher", "pushed_model"),
    }
    ids = {name: result.artifact(*where).id for name, where in outputs.items()}
    for component in ("Trainer", "Evaluator", "Pusher"):
        ids[f"{component.lower()}_execution"] = result.components[component].execution_id
    return ids


def build_model_store(base: str) -> dict:
    """Run A, then run B on other rows with more train steps and an edited module, then the data half of A
    again (every component from cache); all in one store under `<base>/root`.
    """
    root = os.path.join(base, "root")
    serving = os.path.join(base, "serving")
    work_a, work_b = os.path.join(base, "work_a"), os.path.join(base, "work_b")
    os.makedirs(work_a)
    os.makedirs(work_b)
    csv_a = sample_csv(os.path.join(work_a, "data.csv"), rows=1500)
    csv_b = sample_csv(os.path.join(work_b, "data.csv"), rows=1200, skip=3000)
    module_a = write_module(os.path.join(work_a, "taxi_utils.py"))
    module_b = write_module(os.path.join(work_b, "taxi_utils.py"), (MODULE_A_LINE, MODULE_B_LINE))
    runs = []
    for data, module, steps in ((csv_a, module_a, TRAIN_STEPS[0]), (csv_b, module_b, TRAIN_STEPS[1])):
        pipeline = full_pipeline(root, data, module_file=module, train_steps=steps, serving_model_dir=serving)
        runs.append(launcher.run(pipeline, BEAM_ARGS))
    run_a, run_b = runs
    run_c = run_data_half(root, csv_a)
    return {
        "root": root,
        "store": run_a.metadata_uri,
        "serving": serving,
        "pipeline": run_a.pipeline_name,
        "runs": [run_a.run_id, run_b.run_id, run_c.run_id],
        "a": _ids(run_a),
        "b": _ids(run_b),
        "module_paths": [module_a, module_b],
        "train_steps": TRAIN_STEPS,
    }


@functools.cache
def shared_model_store(base: str) -> dict:
    """build_model_store once per test session, however many test modules ask for it."""
    return build_model_store(base)
