"""TFMA metrics computed per batch: TFMA's own combiners, fed accumulators built with numpy per batch and slice.

TFMA unbatches every example and runs each metric combiner's `add_input` on it in Python; on the taxi
data that per-example work is over 80% of the Evaluator's time. Here TFMA's batched extractors
(features, transform, labels, predictions) run as they are, and for each batch and slice the
accumulator of each metric computation is built in one vectorized step, in the accumulator type of
TFMA's own combiner. TFMA's combiners then merge and finish them, and TFMA's derived metrics (AUC
from the histogram, binary accuracy from the confusion matrix, ...), model diffs, validation and
writers run unchanged, so the output is TFMA's, read back with `tfma.load_eval_result`.

Only computations whose combiners are known here take this path (`supported`); any other config
runs TFMA's per-example evaluator.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import tensorflow_model_analysis as tfma
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from tensorflow_model_analysis import constants
from tensorflow_model_analysis.contrib.aggregates import binary_confusion_matrices as bcm_types
from tensorflow_model_analysis.evaluators import evaluator as tfma_evaluator
from tensorflow_model_analysis.evaluators import metrics_plots_and_validations_evaluator as tfma_mpv
from tensorflow_model_analysis.evaluators import metrics_validator
from tensorflow_model_analysis.metrics import binary_confusion_matrices as bcm
from tensorflow_model_analysis.metrics import (
    calibration,
    calibration_histogram,
    example_count,
    metric_specs,
    metric_types,
    tf_metric_wrapper,
)
from tensorflow_model_analysis.slicer import slicer_lib
from tensorflow_model_analysis.utils import util as tfma_util

from beam_pipeline.errors import InputDataError

# The extractors TFMA runs after the batched ones; slices are found per batch here instead.
PER_EXAMPLE_EXTRACTORS = ("ExtractUnbatchedInputs", "ExtractSliceKeys")

_COMBINERS = (
    example_count._ExampleCountCombiner,
    calibration._WeightedLabelsPredictionsExamplesCombiner,
    calibration_histogram._CalibrationHistogramCombiner,
    bcm._BinaryConfusionMatrixCombiner,
    tf_metric_wrapper._CompilableMetricsCombiner,
)


def _computations(config: tfma.EvalConfig) -> Any:
    return tfma_mpv._filter_and_separate_computations(
        metric_specs.to_computations(config.metrics_specs, eval_config=config)
    )


def _plain(computation: metric_types.MetricComputation) -> bool:
    """One label and one prediction per example: no class ids, top-k, averaging or class weights."""
    combiner = computation.combiner
    if type(combiner) not in _COMBINERS:
        return False
    if any(not isinstance(p, metric_types.StandardMetricInputsPreprocessor) for p in computation.preprocessors or ()):
        return False
    if any(k.sub_key or k.output_name or getattr(k, "aggregation_type", None) for k in computation.keys):
        return False
    if getattr(combiner, "_aggregation_type", None) or getattr(combiner, "_class_weights", None):
        return False
    if isinstance(combiner, bcm._BinaryConfusionMatrixCombiner) and combiner._example_id_key:
        return False
    return True


def supported(config: tfma.EvalConfig) -> bool:
    """Whether every metric of `config` (already given TFMA's defaults) can be computed per batch here."""
    options = config.options
    if (
        config.cross_slicing_specs
        or any(s.slice_keys_sql or s.feature_values for s in config.slicing_specs)
        or any(s.query_key for s in config.metrics_specs)
        or options.min_slice_size.value > 1
        or options.compute_confidence_intervals.value
        or len({s.label_key for s in config.model_specs}) > 1
        or any(s.label_keys or s.prediction_keys or s.example_weight_keys for s in config.model_specs)
        or (
            any(s.model_type == tfma.TF_KERAS for s in config.model_specs)
            and (not options.HasField("include_default_metrics") or options.include_default_metrics.value)
        )
    ):
        return False
    comps = _computations(config)
    return (
        not comps.cross_slice_computations
        and not comps.ci_derived_computations
        and all(_plain(c) for c in comps.non_derived_computations)
    )


def evaluator(config: tfma.EvalConfig) -> tfma_evaluator.Evaluator:
    """The TFMA Evaluator to use with TFMA's extractors minus `PER_EXAMPLE_EXTRACTORS`."""
    return tfma_evaluator.Evaluator(
        stage_name="EvaluateMetricsAndPlotsPerBatch",
        run_after=tfma_evaluator.extractor.LAST_EXTRACTOR_STAGE_NAME,
        ptransform=_MetricsPlotsAndValidations(config),
    )


class _MetricsPlotsAndValidations(beam.PTransform):
    """Batched extracts → TFMA's Evaluation dict (metrics, plots, attributions, validations)."""

    def __init__(self, config: tfma.EvalConfig):
        super().__init__()
        self._config = config

    def expand(self, extracts: beam.PCollection) -> dict[str, beam.PCollection]:
        comps = _computations(self._config)
        baseline = tfma.utils.get_baseline_model_spec(self._config)
        sliced = (
            extracts
            | "AccumulatePerBatchAndSlice" >> beam.ParDo(_Accumulate(self._config, comps.non_derived_computations))
            | "CombinePerSlice" >> beam.CombinePerKey(_MergeAccumulators(comps.non_derived_computations))
            | "DerivedAndDiffMetrics"
            >> tfma_mpv._AddDerivedCrossSliceAndDiffMetrics(
                comps.derived_computations, [], [], baseline.name if baseline else None
            )
            | "RemovePrivateMetrics" >> beam.MapTuple(tfma_mpv._remove_private_metrics)
        )
        metrics = sliced | "Metrics" >> beam.Map(tfma_mpv._filter_by_key_type, metric_types.MetricKey)
        return {
            constants.METRICS_KEY: metrics,
            constants.PLOTS_KEY: sliced | "Plots" >> beam.Map(tfma_mpv._filter_by_key_type, metric_types.PlotKey),
            constants.ATTRIBUTIONS_KEY: sliced
            | "Attributions" >> beam.Map(tfma_mpv._filter_by_key_type, metric_types.AttributionsKey),
            constants.VALIDATIONS_KEY: metrics
            | "Validate" >> beam.Map(metrics_validator.validate_metrics, self._config),
        }


class _MergeAccumulators(beam.CombineFn):
    """Per slice: merge the per-batch accumulators with TFMA's combiners, then extract their outputs."""

    def __init__(self, computations: Sequence[metric_types.MetricComputation]):
        self._combiners = [c.combiner for c in computations]

    def setup(self) -> None:
        for c in self._combiners:
            c.setup()

    def create_accumulator(self) -> list[Any]:
        return [c.create_accumulator() for c in self._combiners]

    def add_input(self, accumulator: list[Any], element: list[Any]) -> list[Any]:
        return [c.merge_accumulators([a, e]) for c, a, e in zip(self._combiners, accumulator, element, strict=True)]

    def merge_accumulators(self, accumulators: Any) -> list[Any]:
        return [
            c.merge_accumulators(list(accs))
            for c, accs in zip(self._combiners, zip(*accumulators, strict=True), strict=True)
        ]

    def compact(self, accumulator: list[Any]) -> list[Any]:
        return [c.compact(a) for c, a in zip(self._combiners, accumulator, strict=True)]

    def extract_output(self, accumulator: list[Any]) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for c, a in zip(self._combiners, accumulator, strict=True):
            result.update(c.extract_output(a))
        return result


class _Accumulate(beam.DoFn):
    """Batched extracts → (slice key, [accumulator of each computation]), combined within the bundle.

    Keras metrics (a compilable-metrics combiner) cost one TF call per update, so their rows are kept
    per slice and run in one update when the bundle ends or `FLUSH_ROWS` rows are waiting.
    """

    FLUSH_ROWS = 200_000

    def __init__(self, config: tfma.EvalConfig, computations: Sequence[metric_types.MetricComputation]):
        self._config = config
        self._computations = list(computations)
        # As TFMA's slice key extractor: no slicing spec means the overall slice only.
        self._slice_specs = [slicer_lib.SingleSliceSpec(spec=s) for s in config.slicing_specs] or [
            slicer_lib.SingleSliceSpec()
        ]

    def setup(self) -> None:
        for c in self._computations:
            c.combiner.setup()  # the Keras metrics of a compilable-metrics combiner
        self._keras = [isinstance(c.combiner, tf_metric_wrapper._CompilableMetricsCombiner) for c in self._computations]

    def start_bundle(self) -> None:
        self._partial: dict[Any, list[Any]] = {}
        self._waiting: dict[Any, list[list[tuple[np.ndarray, ...]]]] = {}
        self._waiting_rows = 0

    def process(self, extract: dict[str, Any]) -> Iterator[tuple[Any, list[Any]]]:
        inputs = _Inputs(extract, self._config)
        for slice_key, rows in _slice_rows(extract, self._config, self._slice_specs, inputs.size).items():
            accumulators = [
                None if keras else _accumulator(c, inputs, rows)
                for c, keras in zip(self._computations, self._keras, strict=True)
            ]
            if slice_key in self._partial:
                accumulators = [
                    a if a is None else c.combiner.merge_accumulators([p, a])
                    for c, p, a in zip(self._computations, self._partial[slice_key], accumulators, strict=True)
                ]
            self._partial[slice_key] = accumulators
            waiting = self._waiting.setdefault(slice_key, [[] for _ in self._computations])
            for i, keras in enumerate(self._keras):
                if keras:
                    waiting[i].append(_inputs_of(self._computations[i], inputs, rows))
                    self._waiting_rows += len(rows)
        if self._waiting_rows >= self.FLUSH_ROWS:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for element in self._flush():
            yield WindowedValue(element, MIN_TIMESTAMP, [GlobalWindow()])

    def _flush(self) -> Iterator[tuple[Any, list[Any]]]:
        for slice_key, accumulators in self._partial.items():
            waiting = self._waiting[slice_key]
            yield (
                slice_key,
                [
                    _keras_weights(c.combiner, *(np.concatenate(part) for part in zip(*waiting[i], strict=True)))
                    if keras
                    else a
                    for i, (c, keras, a) in enumerate(zip(self._computations, self._keras, accumulators, strict=True))
                ],
            )
        self.start_bundle()


class _Inputs:
    """Labels, predictions and example weights of one batch, per model: as TFMA stacks them for Keras
    metrics (`columns`, one row per example) and flat (`flat`, one value per example)."""

    def __init__(self, extract: dict[str, Any], config: tfma.EvalConfig):
        self._extract = extract
        self._keys = {s.name if len(config.model_specs) > 1 else "": s.prediction_key for s in config.model_specs}
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self.size: int | None = None  # the first model's prediction count, which every other array must match
        self.size = len(self.columns("prediction", next(iter(self._keys))))

    def columns(self, what: str, model_name: str) -> np.ndarray:
        if (what, model_name) in self._cache:
            return self._cache[(what, model_name)]
        if what == "weight":
            value = self._extract.get(constants.EXAMPLE_WEIGHTS_KEY)
            value = np.ones(self.size) if value is None else _by_model(value, model_name)
        else:
            value = _by_model(
                self._extract[constants.LABELS_KEY if what == "label" else constants.PREDICTIONS_KEY], model_name
            )
            if what == "prediction" and isinstance(value, dict) and self._keys.get(model_name) in value:
                value = value[self._keys[model_name]]
        if isinstance(value, dict):
            raise InputDataError(
                f"Evaluator: the {what} of model {model_name or 'candidate'} is a dict with keys {sorted(value)}: "
                "name the output with ModelSpec.prediction_key, or pass vectorized_metrics=False"
            )
        array = np.asarray(value)
        if array.dtype == object or array.ndim == 0 or array.ndim > 2:
            raise InputDataError(
                f"Evaluator: expected one row of {what}s per example, got an array of shape {array.shape} "
                f"({array.dtype}); pass vectorized_metrics=False for models with ragged or nested outputs"
            )
        array = array.reshape(len(array), -1)
        if what == "prediction" and np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
            raise InputDataError(
                f"Evaluator: model {model_name or 'candidate'} predicted NaN for "
                f"{int(np.isnan(array).any(axis=1).sum())} of {len(array)} examples in a batch"
            )
        if self.size is not None and len(array) != self.size:
            raise InputDataError(f"Evaluator: {len(array)} {what}s for a batch of {self.size} examples")
        self._cache[(what, model_name)] = array
        return array

    def flat(self, what: str, model_name: str) -> np.ndarray:
        array = self.columns(what, model_name)
        if array.shape[1] != 1:
            raise InputDataError(
                f"Evaluator: binary metrics (AUC, calibration, confusion matrices) need one {what} per example, "
                f"model {model_name or 'candidate'} gives {array.shape[1]}; for a multi-class model use "
                "class-specific metrics (binarize) and pass vectorized_metrics=False"
            )
        return array[:, 0].astype(np.float64)


def _by_model(value: Any, model_name: str) -> Any:
    if isinstance(value, dict) and model_name in value:
        return value[model_name]
    return value


def _slice_rows(
    extract: dict[str, Any], config: tfma.EvalConfig, specs: Sequence[Any], size: int
) -> dict[Any, np.ndarray]:
    """Slice key → rows, with TFMA's own slicer run once per distinct combination of the slicing values."""
    names = {name for spec in specs for name in spec._columns}
    if not names:
        return {(): np.arange(size)}
    raw = {n: v for n, v in (extract.get(constants.FEATURES_KEY) or {}).items() if n in names}
    transformed = extract.get(constants.TRANSFORMED_FEATURES_KEY) or {}
    # As TFMA's slice key extractor: one model's transformed features are not keyed by model name.
    models = [""] if len(config.model_specs) == 1 else [s.name for s in config.model_specs if s.name in transformed]
    transformed = {
        m: {n: v for n, v in (transformed if m == "" else transformed[m]).items() if n in names} for m in models
    }
    # No slicing feature in the batch at all: every row is an example without those features.
    per_example = tfma_util.split_extracts({"raw": raw, "transformed": transformed}) or [{} for _ in range(size)]
    groups: dict[Any, list[int]] = defaultdict(list)
    examples: dict[Any, dict[str, Any]] = {}
    for row, example in enumerate(per_example):
        key = _hashable(example)
        groups[key].append(row)
        examples.setdefault(key, example)
    rows: dict[Any, list[np.ndarray]] = defaultdict(list)
    for key, members in groups.items():
        example = examples[key]
        # split_extracts leaves out what is empty
        dicts = [d for d in (example.get("transformed", {}).get(m) for m in models) if d]
        for slice_key in set(slicer_lib.get_slices_for_features_dicts(dicts, example.get("raw", {}), specs)):
            rows[slice_key].append(np.asarray(members))
    return {k: np.sort(np.concatenate(v)) for k, v in rows.items()}


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in sorted(value.items()))
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype == object:
        return tuple(array.ravel().tolist())
    return array.dtype.str, array.shape, array.tobytes()


# -- accumulators in the types of TFMA's combiners ---------------------------------------------------------
def _accumulator(computation: metric_types.MetricComputation, inputs: _Inputs, rows: np.ndarray) -> Any:
    combiner = computation.combiner
    key = computation.keys[0]
    weighted = key.example_weighted
    model = key.model_name
    w = inputs.flat("weight", model)[rows] if weighted else np.ones(len(rows))
    if isinstance(combiner, example_count._ExampleCountCombiner):
        return float(np.sum(w))
    label, prediction = inputs.flat("label", model)[rows], inputs.flat("prediction", model)[rows]
    if isinstance(combiner, calibration._WeightedLabelsPredictionsExamplesCombiner):
        acc = combiner.create_accumulator()
        acc.total_weighted_examples = float(np.sum(w))
        acc.total_weighted_labels = float(np.sum(label * w))
        acc.total_weighted_predictions = float(np.sum(prediction * w))
        return acc
    if isinstance(combiner, calibration_histogram._CalibrationHistogramCombiner):
        return _histogram(combiner, label, prediction, w)
    if isinstance(combiner, bcm._BinaryConfusionMatrixCombiner):
        return _confusion_matrices(combiner, label, prediction, w)
    raise TypeError(f"no per-batch accumulator for {type(combiner).__name__}")


def _inputs_of(
    computation: metric_types.MetricComputation, inputs: _Inputs, rows: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Label, prediction and weight of the rows, for a combiner that takes them all at once."""
    key = computation.keys[0]
    model = key.model_name
    w = inputs.columns("weight", model)[rows] if key.example_weighted else np.ones((len(rows), 1), np.float32)
    return inputs.columns("label", model)[rows], inputs.columns("prediction", model)[rows], w


def _fractional(label: np.ndarray, prediction: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """TFMA's fractional labels: each example as (0, p, w·(1−l)) and (1, p, w·l), zero weights dropped."""
    if np.any((label < 0) | (label > 1)):
        bad = label[(label < 0) | (label > 1)][0]
        raise InputDataError(f"Evaluator: label {bad} is not in [0, 1], which binary metrics (AUC, calibration) need")
    labels = np.concatenate([np.zeros_like(label), np.ones_like(label)])
    predictions = np.concatenate([prediction, prediction])
    weights = np.concatenate([w * (1.0 - label), w * label])
    keep = weights != 0
    return labels[keep], predictions[keep], weights[keep]


def _histogram(combiner: Any, label: np.ndarray, prediction: np.ndarray, w: np.ndarray) -> dict[int, Any]:
    if combiner._fractional_labels:
        label, prediction, w = _fractional(label, prediction, w)
    n = combiner._num_buckets
    value = prediction if combiner._prediction_based_bucketing else label
    with np.errstate(invalid="ignore"):
        index = (value - combiner._left) / combiner._range * n + 1
        # As TFMA: below 0 → bucket 0, at or past n + 1 → n + 1, else truncated.
        bucket = np.where(index < 0, 0, np.where(index >= n + 1, n + 1, index)).astype(np.int64)
    size = n + 2
    counts = np.bincount(bucket, minlength=size)
    labels = np.bincount(bucket, weights=label * w, minlength=size)
    predictions = np.bincount(bucket, weights=prediction * w, minlength=size)
    examples = np.bincount(bucket, weights=w, minlength=size)
    return {
        int(i): calibration_histogram.Bucket(int(i), float(labels[i]), float(predictions[i]), float(examples[i]))
        for i in np.flatnonzero(counts)
    }


def _confusion_matrices(combiner: Any, label: np.ndarray, prediction: np.ndarray, w: np.ndarray) -> dict[float, Any]:
    matrices = combiner._binary_confusion_matrices
    fractional = matrices._enable_fractional_labels
    if fractional:
        label, prediction, w = _fractional(label, prediction, w)
    accumulator = {}
    for threshold in matrices._thresholds:
        positive = label == 1.0 if fractional else label > threshold
        above = prediction > threshold
        matrix = bcm_types.Matrix(
            tp=float(np.sum(w[positive & above])),
            tn=float(np.sum(w[~positive & ~above])),
            fp=float(np.sum(w[~positive & above])),
            fn=float(np.sum(w[positive & ~above])),
        )
        accumulator[threshold] = bcm_types._ThresholdEntry(matrix, [], [], [], [])
    return accumulator


def _keras_weights(combiner: Any, label: np.ndarray, prediction: np.ndarray, w: np.ndarray) -> Any:
    """The Keras metrics' weights after one update on the slice's rows, as TFMA's batch step leaves them."""
    accumulator = combiner.create_accumulator()
    for output_index, output_name in enumerate(combiner._output_names):
        for metric_index, metric in enumerate(combiner._metrics[output_name]):
            metric.reset_states()
            metric.update_state(label, prediction, sample_weight=w)
            accumulator.add_weights(output_index, metric_index, metric.get_weights())
    return accumulator
