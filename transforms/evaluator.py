"""Evaluator: TFMA metrics on an Examples split (the eval split, or next-day data) and model validation into a blessing.

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

from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import tensorflow_model_analysis as tfma
from google.protobuf import json_format

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, MODEL, MODEL_BLESSING, MODEL_EVALUATION, SCHEMA
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import MetadataError, PipelineDefinitionError
from beam_pipeline.nodes import latest_blessed_model
from transforms._arrow_layout import conform_to_schema
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

    Inputs: `examples` (evaluated split `example_split`, default "eval"), `model`, and optionally
    the training `schema`. For a next-day evaluation, `examples` come from an ExampleGen of their
    own, as in TFX; give the `schema` too, and each column it names is cast to its type (a file
    whose integers read as floats, or the reverse), and a column it names that the examples lack
    fails the run naming it. Outputs: `evaluation`,
    TFMA's output directory (tfma.load_eval_result / load_metrics / load_validation_result read
    it), and `blessing` with property blessed=0/1, a `BLESSED` or `NOT_BLESSED` file listing the
    reasons and `validation.json` (reasons with metric, value, threshold and slice).
    """

    INPUTS = {
        "examples": InputSpec(EXAMPLES),
        "model": InputSpec(MODEL),
        "schema": InputSpec(SCHEMA, optional=True),
        "baseline_model": InputSpec(MODEL, optional=True),
    }
    OUTPUTS = {"evaluation": MODEL_EVALUATION, "blessing": MODEL_BLESSING}

    def __init__(
        self,
        *,
        examples: Channel,
        model: Channel,
        eval_config: tfma.EvalConfig | Mapping[str, Any] | str,
        example_split: str = "eval",
        schema: Channel | None = None,
        baseline_model: Channel | None = None,
        vectorized_metrics: bool = True,
        component_id: str | None = None,
    ):
        config = candidate_config(parse_eval_config(eval_config))
        super().__init__(
            inputs={"examples": examples, "model": model, "schema": schema, "baseline_model": baseline_model},
            params={"eval_config": json_format.MessageToDict(config), "example_split": example_split},
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

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        split = self.params["example_split"]
        splits = input_static.get("examples", {}).get("splits")
        if splits is not None and split not in splits:
            raise PipelineDefinitionError(f"{self.id}: example_split {split!r} is not one of the splits {splits}")
        return {name: {} for name in self.OUTPUTS}

    def splits_read(self, name: str, splits: Sequence[str]) -> list[str]:
        return [s for s in splits if s == self.params["example_split"]]

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """The baseline, when change thresholds need one and no `baseline_model` input is wired: the
        model of this Evaluator's latest blessing whose push was not refused (see
        `beam_pipeline.nodes.LatestBlessedModel`, which a Resolver node uses the same way)."""
        if not self.has_change_thresholds or "baseline_model" in self.inputs:
            return {}
        try:
            model = latest_blessed_model(store, pipeline_name, self.id)
        except MetadataError as e:
            raise MetadataError(f"{self.id}: {e}") from None
        return {"baseline_model": model} if model is not None else {}

    # -- graph ---------------------------------------------------------------------------------------
    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        model_committed = inputs["model"]
        baseline_uri = ctx.input_uris.get("baseline_model") if "baseline_model" in inputs else None
        if baseline_uri is None and ctx.resolved.get("baseline_model") is not None:
            baseline_uri = ctx.resolved["baseline_model"].uri
        batches, evaluated_on = self._eval_batches(inputs)
        evaluation_uri = ctx.output_uri("evaluation")
        files_written = (
            batches
            | "WaitForModel" >> beam.Map(lambda batch, _model: batch, beam.pvalue.AsSingleton(model_committed))
            | "Evaluate"
            >> EvaluateModel(
                artifact_io.join(ctx.input_uris["model"], SERVING_MODEL_DIR),
                self.eval_config,
                evaluation_uri,
                baseline_path=artifact_io.join(baseline_uri, SERVING_MODEL_DIR) if baseline_uri else None,
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
            baseline_uri=baseline_uri,
            has_thresholds=self.has_value_thresholds or self.has_change_thresholds,
        )
        blessing = files_written | "Bless" >> beam.Map(judge, beam.pvalue.AsSingleton(model_committed))
        ctx.publish("blessing", blessing)
        return {}

    def _eval_batches(self, inputs: dict[str, Any]) -> tuple[beam.PCollection, str]:
        """The RecordBatches to evaluate (cast to the schema's types when given) and where they come from."""
        split = self.params["example_split"]
        splits = inputs["examples"]
        if split not in splits:
            known = self.ctx.input_static.get("examples", {}).get("splits") or list(splits)
            raise PipelineDefinitionError(
                f"{self.id}: example_split {split!r} is not one of the splits {sorted(known)}"
            )
        location = f"{self.ctx.input_uris['examples']} split {split}"
        batches = splits[split]
        if "schema" in inputs:
            batches = batches | "ConformToSchema" >> beam.Map(
                conform_to_schema, beam.pvalue.AsSingleton(inputs["schema"]), location
            )
        return batches, location
