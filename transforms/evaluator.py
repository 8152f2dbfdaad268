"""Evaluator: TFMA metrics on the eval split (or a next-day file) and model validation into a blessing.

The eval split's RecordBatches, streamed from its committed Parquet, are fed to TFMA's Arrow path.
Each batch gets the column `__raw_record__` of serialized tf.train.Example (tfx_bsl's encoder)
because the model contract's `from_examples` and `transform_features` signatures take serialized
examples; the raw columns stay as features for slicing. TFMA never loads a model while the graph
is built: the model type is set explicitly and the SavedModel path `<model uri>/Format-Serving`
comes from the input's final URI (`ctx.input_uris`); the stage that feeds TFMA waits on the
committed Model artifact as a side input, so evaluation cannot start before training has finished.

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
import tensorflow_model_analysis as tfma
from google.protobuf import json_format

from beam_pipeline import artifact_io, fingerprints
from beam_pipeline.artifacts import EXAMPLES, MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import InputDataError, MetadataError, PipelineDefinitionError
from transforms import _example_io as io_
from transforms._blessing import BLESSED_FILE, NOT_BLESSED_FILE, VALIDATION_FILE, Judge
from transforms.eval_config import binary_classification_eval_config, candidate_config, parse_eval_config
from transforms.evaluate_model import EvaluateModel

__all__ = [
    "BLESSED_FILE",
    "NOT_BLESSED_FILE",
    "VALIDATION_FILE",
    "Evaluator",
    "binary_classification_eval_config",
    "parse_eval_config",
]

SERVING_MODEL_DIR = "Format-Serving"


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
        vectorized_metrics: bool = True,
        component_id: str | None = None,
    ):
        config = candidate_config(parse_eval_config(eval_config))
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
        # Not a parameter: both ways give the same results (tests/test_fast_metrics.py), so not in the cache key.
        self.vectorized_metrics = vectorized_metrics

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

    def splits_read(self, name: str, splits: Sequence[str]) -> list[str]:
        return [] if self.params["data_path"] else [s for s in splits if s == self.params["example_split"]]

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
        baseline: Artifact | None = ctx.resolved.get("baseline_model")
        batches, evaluated_on = self._eval_batches(inputs, model_committed.pipeline)
        evaluation_uri = ctx.output_uri("evaluation")
        files_written = (
            batches
            | "WaitForModel" >> beam.Map(lambda batch, _model: batch, beam.pvalue.AsSingleton(model_committed))
            | "Evaluate"
            >> EvaluateModel(
                artifact_io.join(ctx.input_uris["model"], SERVING_MODEL_DIR),
                self.eval_config,
                evaluation_uri,
                baseline_path=artifact_io.join(baseline.uri, SERVING_MODEL_DIR) if baseline else None,
                data_location=evaluated_on,
                vectorized_metrics=self.vectorized_metrics,
            )
        )
        ctx.publish(
            "evaluation", files_written | "EvaluationProperties" >> beam.Map(lambda _: {"evaluated_on": evaluated_on})
        )

        judge = Judge(
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
                known = self.ctx.input_static.get("examples", {}).get("splits") or list(splits)
                raise PipelineDefinitionError(
                    f"{self.id}: example_split {split!r} is not one of the splits {sorted(known)}"
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
