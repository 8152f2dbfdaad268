"""Evaluator: TFMA metrics on the eval split (or a next-day file) and model validation into a blessing.

The RecordBatches already in the graph are fed to TFMA's Arrow path. Each batch gets the column
`__raw_record__` of serialized tf.train.Example (tfx_bsl's encoder) because the model contract's
`from_examples` and `transform_features` signatures take serialized examples; the raw columns stay
as features for slicing. TFMA never loads a model while the graph is built: the model type is set
explicitly and the SavedModel path `<model uri>/Format-Serving` comes from the input's final URI
(`ctx.input_uris`); the stage that feeds TFMA waits on the committed Model artifact as a side
input, so evaluation cannot start before training has finished.

Validation: value thresholds always apply; change thresholds compare against the baseline, the
model of this Evaluator's latest blessing (`resolve`). Without a baseline (first run) the change
thresholds are dropped and the model is judged on its value thresholds alone; with change
thresholds only, it is blessed (TFMA's rubber stamp), otherwise no model could ever become the
first baseline. A config without any threshold never blesses, so a forgotten threshold cannot push
a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow_model_analysis as tfma
from google.protobuf import json_format
from tensorflow_model_analysis.proto import metrics_for_slice_pb2, validation_result_pb2
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

from beam_pipeline import artifact_io, fingerprints
from beam_pipeline.artifacts import EXAMPLES, MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import InputDataError, MetadataError, PipelineDefinitionError
from transforms import _example_io as io_

SERVING_MODEL_DIR = "Format-Serving"
BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
VALIDATION_FILE = "validation.json"
# TFMA runs the model once per batch; ExampleGen batches can be whole file blocks.
MAX_BATCH_ROWS = 2048
_LOWER_IS_BETTER = {"binary_crossentropy"}


def binary_classification_eval_config(
    label_key: str,
    *,
    slice_features: Sequence[str] = (),
    lower_bounds: Mapping[str, float] | None = None,
    upper_bounds: Mapping[str, float] | None = None,
    max_regression: Mapping[str, float] | None = None,
    signature_name: str = "from_examples",
    preprocessing_function_names: Sequence[str] = ("transform_features",),
) -> tfma.EvalConfig:
    """The metrics a binary classifier is judged on, overall and per value of each slice feature.

    Metrics: example_count, binary_accuracy, auc, auc_pr, calibration (+ calibration plot) and
    binary_crossentropy. `lower_bounds`/`upper_bounds` are value thresholds by metric name;
    `max_regression` is how much worse than the baseline a metric may get (0 = no regression),
    in the metric's own better direction (lower for binary_crossentropy, higher for the others).
    """
    metrics = {
        "example_count": tfma.MetricConfig(class_name="ExampleCount"),
        "binary_accuracy": tfma.MetricConfig(class_name="BinaryAccuracy"),
        "auc": tfma.MetricConfig(class_name="AUC"),
        "auc_pr": tfma.MetricConfig(class_name="AUC", config=json.dumps({"curve": "PR", "name": "auc_pr"})),
        "calibration": tfma.MetricConfig(class_name="Calibration"),
        "binary_crossentropy": tfma.MetricConfig(class_name="BinaryCrossentropy"),
    }
    lower_bounds, upper_bounds, max_regression = lower_bounds or {}, upper_bounds or {}, max_regression or {}
    unknown = sorted((set(lower_bounds) | set(upper_bounds) | set(max_regression)) - set(metrics))
    if unknown:
        raise PipelineDefinitionError(f"thresholds for unknown metrics {unknown}; metrics are {sorted(metrics)}")
    if "calibration" in max_regression:
        raise PipelineDefinitionError("calibration has no better direction (1.0 is best): use lower/upper bounds")
    for name, config in metrics.items():
        if name in lower_bounds or name in upper_bounds:
            bounds = config.threshold.value_threshold
            if name in lower_bounds:
                bounds.lower_bound.value = lower_bounds[name]
            if name in upper_bounds:
                bounds.upper_bound.value = upper_bounds[name]
        if name in max_regression:
            tolerance = max_regression[name]
            if tolerance < 0:
                raise PipelineDefinitionError(f"max_regression[{name!r}] = {tolerance}: must be >= 0")
            change = config.threshold.change_threshold
            if name in _LOWER_IS_BETTER:
                change.direction = tfma.MetricDirection.LOWER_IS_BETTER
                change.absolute.value = tolerance
            else:
                change.direction = tfma.MetricDirection.HIGHER_IS_BETTER
                change.absolute.value = 0.0 - tolerance  # not -0.0, which reads oddly in reasons
    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                signature_name=signature_name,
                preprocessing_function_names=list(preprocessing_function_names),
                label_key=label_key,
            )
        ],
        slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[f]) for f in slice_features],
        metrics_specs=[tfma.MetricsSpec(metrics=[*metrics.values(), tfma.MetricConfig(class_name="CalibrationPlot")])],
    )


def parse_eval_config(value: tfma.EvalConfig | Mapping[str, Any] | str) -> tfma.EvalConfig:
    """An EvalConfig from the proto itself, its JSON text or its JSON dict."""
    config = tfma.EvalConfig()
    try:
        if isinstance(value, tfma.EvalConfig):
            config.CopyFrom(value)
        elif isinstance(value, str):
            json_format.Parse(value, config)
        elif isinstance(value, Mapping):
            json_format.ParseDict(dict(value), config)
        else:
            raise PipelineDefinitionError(
                f"eval_config must be a tfma.EvalConfig, JSON or dict, got {type(value).__name__}"
            )
    except json_format.ParseError as e:
        raise PipelineDefinitionError(f"eval_config is not a valid tfma.EvalConfig: {e}") from None
    return config


def _candidate_config(config: tfma.EvalConfig) -> tfma.EvalConfig:
    """Check the user's config and fill the defaults that keep model loading out of graph construction."""
    if len(config.model_specs) > 1 or any(s.is_baseline for s in config.model_specs):
        raise PipelineDefinitionError(
            "eval_config must have one ModelSpec (the candidate); the baseline is the latest blessed model"
        )
    if not config.model_specs:
        config.model_specs.add()
    spec = config.model_specs[0]
    if not spec.label_key and not spec.label_keys:
        raise PipelineDefinitionError(
            "eval_config.model_specs[0].label_key is required (the transformed label, e.g. 'tips_xf')"
        )
    spec.name = ""
    spec.signature_name = spec.signature_name or "from_examples"
    # An explicit type stops TFMA from trying to load the model to guess it.
    spec.model_type = spec.model_type or tfma.TF_GENERIC
    if spec.model_type == tfma.TF_KERAS and not config.options.HasField("include_default_metrics"):
        # Keras default metrics are read from the loaded model while the graph is built.
        config.options.include_default_metrics.value = False
    if not config.metrics_specs:
        raise PipelineDefinitionError("eval_config has no metrics_specs: nothing to evaluate")
    tfma.utils.verify_eval_config(config)
    return config


class Evaluator(Component):
    """Evaluate a model with TFMA and bless it when it meets its thresholds.

    Inputs: `examples` (evaluated split `example_split`, default "eval"; or, with `data_path`, CSV
    or Parquet files read into the same RecordBatch layout) and `model`. Outputs: `evaluation`,
    TFMA's output directory (tfma.load_eval_result / load_metrics / load_validation_result read
    it), and `blessing` with property blessed=0/1, a `BLESSED` or `NOT_BLESSED` file listing the
    reasons and `validation.json` (reasons with metric, value, threshold and slice).
    """

    INPUTS = {"examples": InputSpec(EXAMPLES), "model": InputSpec(MODEL)}
    OUTPUTS = {"evaluation": MODEL_EVALUATION, "blessing": MODEL_BLESSING}

    def __init__(
        self,
        *,
        examples: Channel,
        model: Channel,
        eval_config: tfma.EvalConfig | Mapping[str, Any] | str,
        example_split: str = "eval",
        data_path: str | None = None,
        component_id: str | None = None,
    ):
        config = _candidate_config(parse_eval_config(eval_config))
        super().__init__(
            inputs={"examples": examples, "model": model},
            params={
                "eval_config": json_format.MessageToDict(config),
                "example_split": example_split,
                "data_path": data_path,
            },
            component_id=component_id,
        )
        self.eval_config = config

    # -- compile time --------------------------------------------------------------------------------
    @property
    def has_change_thresholds(self) -> bool:
        return tfma.utils.has_change_threshold(self.eval_config)

    @property
    def has_value_thresholds(self) -> bool:
        without_baseline = tfma.utils.update_eval_config_with_defaults(
            self.eval_config, has_baseline=False, rubber_stamp=True
        )
        return bool(tfma.metrics.metric_thresholds_from_metrics_specs(without_baseline.metrics_specs))

    def data_files(self) -> list[str]:
        """The next-day data files matched now (never memoized: the same Pipeline may run again)."""
        return io_.match_files([self.params["data_path"]])

    def external_fingerprint(self, inputs=None) -> str:
        """Next-day data files decide the outputs without being channel inputs.

        The resolved baseline is part of the cache key as a resolved artifact (counting as none when
        it is the candidate model itself, so an unchanged pipeline stays fully cached).
        """
        if not self.params["data_path"]:
            return ""
        return json.dumps({path: fingerprints.file_fingerprint(path) for path in self.data_files()}, sort_keys=True)

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        examples = input_static.get("examples", {})
        if self.params["data_path"]:
            for path in self.data_files():
                _check_columns(path, examples["arrow_schema"])
        else:
            split = self.params["example_split"]
            splits = examples.get("splits")
            if splits is not None and split not in splits:
                raise PipelineDefinitionError(f"{self.id}: example_split {split!r} is not one of the splits {splits}")
        return {name: {} for name in self.OUTPUTS}

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """The baseline: the model of this Evaluator's latest blessing whose push was not refused (only
        needed for change thresholds). A blessing that lost a push race to a better model is no baseline:
        the served model is."""
        if not self.has_change_thresholds:
            return {}
        blessings = store.latest_artifacts(
            MODEL_BLESSING.name, pipeline_name, {"blessed": 1, "producer_component": self.id}
        )
        refused = {
            p.properties.get("blessing_uri")
            for p in store.latest_artifacts(PUSHED_MODEL.name, pipeline_name, {"push_refused": 1})
        }
        blessings = [b for b in blessings if b.uri not in refused]
        if not blessings:
            return {}
        model_uri = blessings[0].properties.get("model_uri")
        for model in store.latest_artifacts(MODEL.name, pipeline_name):
            if model.uri == model_uri:
                return {"baseline_model": model}
        raise MetadataError(
            f"{self.id}: blessing {blessings[0].uri} names model {model_uri!r}, which ML Metadata does not list "
            f"as a published Model of pipeline {pipeline_name!r}"
        )

    # -- graph ---------------------------------------------------------------------------------------
    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        model_committed = inputs["model"]
        model_dir = artifact_io.join(ctx.input_uris["model"], SERVING_MODEL_DIR)
        baseline: Artifact | None = ctx.resolved.get("baseline_model")
        config = tfma.utils.update_eval_config_with_defaults(
            self.eval_config, has_baseline=baseline is not None, rubber_stamp=baseline is None
        )
        shared_models = [
            tfma.default_eval_shared_model(
                eval_saved_model_path=model_dir,
                model_name=tfma.CANDIDATE_KEY if baseline else "",
                eval_config=config,
                rubber_stamp=baseline is None,
            )
        ]
        if baseline is not None:
            shared_models.append(
                tfma.default_eval_shared_model(
                    eval_saved_model_path=artifact_io.join(baseline.uri, SERVING_MODEL_DIR),
                    model_name=tfma.BASELINE_KEY,
                    eval_config=config,
                )
            )

        batches, evaluated_on = self._eval_batches(inputs, model_committed.pipeline)
        evaluation_uri = ctx.output_uri("evaluation")
        written = (
            batches
            | "WaitForModel" >> beam.Map(lambda batch, _model: batch, beam.pvalue.AsSingleton(model_committed))
            | "Rebatch" >> beam.FlatMap(_slices, MAX_BATCH_ROWS)
            | "AddSerializedExamples" >> beam.ParDo(_AddSerializedExamples())
            | "TFMA"
            >> tfma.ExtractEvaluateAndWriteResults(
                eval_shared_model=shared_models if baseline else shared_models[0],
                eval_config=config,
                output_path=evaluation_uri,
                display_only_data_location=evaluated_on,
            )
        )
        files_written = (
            tuple(_pcollections(written))
            | "EvaluationFiles" >> beam.Flatten()
            | "EvaluationWritten" >> beam.combiners.Count.Globally()
        )
        ctx.publish(
            "evaluation", files_written | "EvaluationProperties" >> beam.Map(lambda _: {"evaluated_on": evaluated_on})
        )

        judge = _Judge(
            evaluation_uri=evaluation_uri,
            blessing_uri=ctx.output_uri("blessing"),
            baseline_uri=baseline.uri if baseline else None,
            has_thresholds=self.has_value_thresholds or self.has_change_thresholds,
        )
        blessing = files_written | "Bless" >> beam.Map(judge, beam.pvalue.AsSingleton(model_committed))
        ctx.publish("blessing", blessing)
        return {}

    def _eval_batches(self, inputs: dict[str, Any], pipeline: beam.Pipeline) -> tuple[beam.PCollection, str]:
        """The RecordBatches to evaluate and a description of where they come from."""
        data_path = self.params["data_path"]
        if not data_path:
            split = self.params["example_split"]
            splits = inputs["examples"]
            if split not in splits:
                raise PipelineDefinitionError(
                    f"{self.id}: example_split {split!r} is not one of the splits {sorted(splits)}"
                )
            return splits[split], f"split {split}"
        arrow_schema = self.ctx.input_static["examples"]["arrow_schema"]
        units = []
        for path in self.data_files():  # their columns were checked by static_outputs
            if path.endswith(".parquet"):
                units.extend(io_.parquet_row_groups(path))
            else:
                units.extend(io_.byte_ranges(path, 32 << 20))
        batches = (
            pipeline
            | "DataUnits" >> beam.Create(units)
            | "DistributeData" >> beam.Reshuffle()
            | "ReadData" >> beam.ParDo(_ReadFile(arrow_schema))
        )
        return batches, data_path


# -- reading next-day data ------------------------------------------------------------------------------
def _check_columns(path: str, arrow_schema: pa.Schema) -> None:
    """Every column the model was trained on must be in the file (extra columns are ignored)."""
    names = io_.parquet_schema(path).names if path.endswith(".parquet") else io_.csv_header(path)
    missing = [n for n in arrow_schema.names if n not in names]
    if missing:
        raise InputDataError(f"{path}: missing columns {missing}; the examples have {arrow_schema.names}")


def _flat_type(list_type: pa.DataType) -> pa.DataType:
    value = list_type.value_type
    if pa.types.is_integer(value):
        return pa.int64()
    if pa.types.is_floating(value):
        return pa.float64()
    return pa.string()


def _conform(table: pa.Table, arrow_schema: pa.Schema) -> pa.RecordBatch:
    """Flat file columns → the examples' large_list layout, in the examples' column order."""
    batch = io_.to_list_batch(table.select(arrow_schema.names))
    return pa.RecordBatch.from_arrays(
        [batch.column(i).cast(field.type) for i, field in enumerate(arrow_schema)], schema=arrow_schema
    )


class _ReadFile(beam.DoFn):
    """Read one CSV byte range or Parquet row group into the examples' RecordBatch layout."""

    def __init__(self, arrow_schema: pa.Schema):
        self._schema = arrow_schema

    def process(self, unit: tuple[str, int, int]) -> Iterator[pa.RecordBatch]:
        path, start, end = unit
        if path.endswith(".parquet"):
            table = io_.read_parquet_group(path, start)
        else:
            types = {f.name: _flat_type(f.type) for f in self._schema}
            flat = pa.schema([pa.field(n, types.get(n, pa.string())) for n in io_.csv_header(path)])
            table, _ = io_.parse_csv_block(path, start, end, flat, "error")
        if table.num_rows:
            yield _conform(table, self._schema)


# -- feeding TFMA ------------------------------------------------------------------------------------
def _slices(batch: pa.RecordBatch, max_rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, max_rows):
        yield batch.slice(start, max_rows)


class _AddSerializedExamples(beam.DoFn):
    """Append the serialized tf.Example of each row as TFMA's raw-record column.

    Missing values arrive as null lists; an empty list (possible from Parquet or TFRecord input) is
    encoded as null too, i.e. a feature without a value list, which tf.io.parse_example treats as
    missing: a FixedLenFeature then gets its default instead of failing on zero values.
    """

    def setup(self) -> None:
        self._encoder = RecordBatchToExamplesEncoder()

    def process(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        columns = []
        for column in batch.columns:
            empty = pc.fill_null(pc.equal(pc.list_value_length(column), 0), True)
            columns.append(pc.if_else(empty, pa.scalar(None, column.type), column))
        serialized = self._encoder.encode(pa.RecordBatch.from_arrays(columns, schema=batch.schema))
        raw = pa.array([[s] for s in serialized], pa.large_list(pa.large_binary()))
        yield pa.RecordBatch.from_arrays([*batch.columns, raw], names=[*batch.schema.names, tfma.ARROW_INPUT_COLUMN])


def _pcollections(value: Any) -> Iterator[beam.PCollection]:
    """Every PCollection in TFMA's nested dict of writer results (each completes once its files exist)."""
    if isinstance(value, beam.PCollection):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _pcollections(v)


# -- judging -----------------------------------------------------------------------------------------
def _slice_name(slice_key: metrics_for_slice_pb2.SliceKey) -> str:
    return tfma.slicer.stringify_slice_key(tfma.slicer.deserialize_slice_key(slice_key))


def _describe_threshold(threshold: tfma.MetricThreshold) -> str:
    if threshold.HasField("value_threshold"):
        bounds = threshold.value_threshold
        parts = []
        if bounds.HasField("lower_bound"):
            parts.append(f">= {bounds.lower_bound.value:g}")
        if bounds.HasField("upper_bound"):
            parts.append(f"<= {bounds.upper_bound.value:g}")
        return "required " + " and ".join(parts)
    change = threshold.change_threshold
    op = "<=" if change.direction == tfma.MetricDirection.LOWER_IS_BETTER else ">="
    parts = []
    if change.HasField("absolute"):
        parts.append(f"change {op} {change.absolute.value:g}")
    if change.HasField("relative"):
        parts.append(f"relative change {op} {change.relative.value:g}")
    return "required " + " and ".join(parts)


def _metric_values(evaluation_uri: str) -> dict[tuple[bytes, bytes], float]:
    values = {}
    for per_slice in tfma.load_metrics(evaluation_uri):
        slice_bytes = per_slice.slice_key.SerializeToString(deterministic=True)
        for kv in per_slice.metric_keys_and_values:
            if kv.value.HasField("double_value"):
                values[slice_bytes, kv.key.SerializeToString(deterministic=True)] = kv.value.double_value.value
    return values


def _reasons(result: validation_result_pb2.ValidationResult, evaluation_uri: str) -> list[dict[str, Any]]:
    """One dict per failed check: slice, metric, value(s), threshold and a sentence saying it."""
    values = _metric_values(evaluation_uri) if result.metric_validations_per_slice else {}
    reasons = []
    for per_slice in result.metric_validations_per_slice:
        slice_name = _slice_name(per_slice.slice_key)
        slice_bytes = per_slice.slice_key.SerializeToString(deterministic=True)
        for failure in per_slice.failures:
            key = failure.metric_key
            value_key = metrics_for_slice_pb2.MetricKey()
            value_key.CopyFrom(key)
            value_key.ClearField("is_diff")
            candidate = values.get((slice_bytes, value_key.SerializeToString(deterministic=True)))
            reason: dict[str, Any] = {
                "slice": slice_name,
                "metric": key.name,
                "value": candidate,
                "threshold": json_format.MessageToDict(failure.metric_threshold),
            }
            threshold_text = _describe_threshold(failure.metric_threshold)
            if failure.message == "Metric not found.":
                text = f"{key.name} on slice {slice_name}: not computed; {threshold_text}"
            elif key.is_diff:
                value_key.model_name = tfma.BASELINE_KEY
                baseline = values.get((slice_bytes, value_key.SerializeToString(deterministic=True)))
                change = failure.metric_value.double_value.value
                reason.update(baseline_value=baseline, change=change)
                text = (
                    f"{key.name} on slice {slice_name}: {_fmt(candidate)} vs baseline {_fmt(baseline)} "
                    f"(change {change:+.4g}); {threshold_text}"
                )
            else:
                value = failure.metric_value.double_value.value
                reason["value"] = value
                text = f"{key.name} on slice {slice_name}: {value:.4g}; {threshold_text}"
            reason["message"] = text
            reasons.append(reason)
    for spec in result.missing_slices:
        spec_text = json.dumps(json_format.MessageToDict(spec)) if spec.ByteSize() else "Overall"
        text = f"slice {spec_text} has no examples, so its thresholds were not checked"
        reasons.append({"slice": spec_text, "message": text})
    return reasons


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class _Judge:
    """Turn TFMA's validation result into the blessing files and properties."""

    def __init__(self, *, evaluation_uri: str, blessing_uri: str, baseline_uri: str | None, has_thresholds: bool):
        self.evaluation_uri = evaluation_uri
        self.blessing_uri = blessing_uri
        self.baseline_uri = baseline_uri
        self.has_thresholds = has_thresholds

    def __call__(self, _files_written: int, model: Artifact) -> dict[str, Any]:
        result = tfma.load_validation_result(self.evaluation_uri)
        reasons = _reasons(result, self.evaluation_uri)
        blessed = bool(result.validation_ok) and self.has_thresholds
        if not self.has_thresholds:
            reasons.append({"message": "eval_config has no thresholds: a model is only blessed against thresholds"})
        if blessed:
            summary = "blessed: every threshold is met"
            if self.baseline_uri is None:
                summary += " (no blessed baseline yet: change thresholds were not applied)"
            else:
                summary += f" (baseline {self.baseline_uri})"
        else:
            summary = f"not blessed: {len(reasons)} check(s) failed: " + "; ".join(r["message"] for r in reasons[:5])
            if len(reasons) > 5:
                summary += f"; and {len(reasons) - 5} more (see {VALIDATION_FILE})"
        report = {
            "blessed": blessed,
            "summary": summary,
            "reasons": reasons,
            "model_uri": model.uri,
            "baseline_model_uri": self.baseline_uri,
            "rubber_stamp": bool(result.rubber_stamp),
            "validation_ok": bool(result.validation_ok),
        }
        marker = BLESSED_FILE if blessed else NOT_BLESSED_FILE
        artifact_io.write_text(
            artifact_io.join(self.blessing_uri, marker), "\n".join([summary, *(r["message"] for r in reasons)]) + "\n"
        )
        artifact_io.write_text(
            artifact_io.join(self.blessing_uri, VALIDATION_FILE), json.dumps(report, indent=2, sort_keys=True)
        )
        properties = {"blessed": int(blessed), "model_uri": model.uri, "blessing_message": summary}
        if self.baseline_uri:
            properties["baseline_model_uri"] = self.baseline_uri
        return properties
