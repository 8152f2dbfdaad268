"""EvaluateModel: TFMA metrics of a SavedModel (and its baseline) over RecordBatches, in any Beam pipeline."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
import pyarrow as pa
import tensorflow_model_analysis as tfma
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

from transforms import _fast_metrics
from transforms._tf_examples import serialize_rows

# TFMA runs the model once per batch; ExampleGen batches can be whole file blocks.
MAX_BATCH_ROWS = 2048


class EvaluateModel(beam.PTransform):
    """TFMA's metrics, plots and validation of `model_path` on RecordBatches, written to `output_path`.

    Usable in any Beam pipeline; the Evaluator component adds the artifacts and the blessing. Example::

        config = binary_classification_eval_config("tips_xf", slice_features=["payment_type"])
        done = eval_batches | EvaluateModel("/models/taxi/1", config, "/tmp/evaluation")
        # after the run: tfma.load_eval_result("/tmp/evaluation")

    Input: RecordBatches with list-typed columns, the features the model's `from_examples`
    signature parses (each row is also given to it as a serialized tf.Example). With
    `baseline_path`, `eval_config` must name a candidate and a baseline model
    (`eval_config.candidate_config`) and change thresholds compare the two. The metrics are computed
    per batch when the config allows (`vectorized_metrics`, see `_fast_metrics`), else by TFMA's
    per-example evaluator; the output is TFMA's either way. Output: one element once every file
    is written.
    """

    def __init__(
        self,
        model_path: str,
        eval_config: tfma.EvalConfig,
        output_path: str,
        *,
        baseline_path: str | None = None,
        data_location: str = "",
        vectorized_metrics: bool = True,
    ):
        super().__init__()
        self._model, self._baseline, self._output = model_path, baseline_path, output_path
        self._location, self._vectorized = data_location, vectorized_metrics
        self._config = tfma.utils.update_eval_config_with_defaults(
            eval_config, has_baseline=baseline_path is not None, rubber_stamp=baseline_path is None
        )

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        config, baseline = self._config, self._baseline
        candidate = tfma.default_eval_shared_model(
            eval_saved_model_path=self._model,
            model_name=tfma.CANDIDATE_KEY if baseline else "",
            eval_config=config,
            rubber_stamp=baseline is None,
        )
        shared: Any = candidate
        if baseline is not None:
            shared = [
                candidate,
                tfma.default_eval_shared_model(
                    eval_saved_model_path=baseline, model_name=tfma.BASELINE_KEY, eval_config=config
                ),
            ]
        written = (
            batches
            | "Rebatch" >> beam.FlatMap(_slices, MAX_BATCH_ROWS)
            | "AddSerializedExamples" >> beam.ParDo(_AddSerializedExamples())
            | "TFMA"
            >> tfma.ExtractEvaluateAndWriteResults(
                eval_shared_model=shared,
                eval_config=config,
                output_path=self._output,
                display_only_data_location=self._location,
                **self._metrics_per_batch(shared),
            )
        )
        return (
            tuple(_pcollections(written))
            | "EvaluationFiles" >> beam.Flatten()
            | "EvaluationWritten" >> beam.combiners.Count.Globally()
        )

    def _metrics_per_batch(self, shared: Any) -> dict[str, Any]:
        """TFMA's extractors and our per-batch metrics evaluator, when the config allows (else TFMA's own)."""
        if not (self._vectorized and _fast_metrics.supported(self._config)):
            return {}
        extractors = [
            e
            for e in tfma.default_extractors(eval_shared_model=shared, eval_config=self._config)
            if e.stage_name not in _fast_metrics.PER_EXAMPLE_EXTRACTORS
        ]
        return {"extractors": extractors, "evaluators": [_fast_metrics.evaluator(self._config)]}


def _slices(batch: pa.RecordBatch, max_rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, max_rows):
        yield batch.slice(start, max_rows)


class _AddSerializedExamples(beam.DoFn):
    """Append the serialized tf.Example of each row as TFMA's raw-record column."""

    def setup(self) -> None:
        self._encoder = RecordBatchToExamplesEncoder()

    def process(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        serialized = serialize_rows(self._encoder, batch)
        raw = pa.array([[s] for s in serialized], pa.large_list(pa.large_binary()))
        yield pa.RecordBatch.from_arrays([*batch.columns, raw], names=[*batch.schema.names, tfma.ARROW_INPUT_COLUMN])


def _pcollections(value: Any) -> Iterator[beam.PCollection]:
    """Every PCollection in TFMA's nested dict of writer results (each completes once its files exist)."""
    if isinstance(value, beam.PCollection):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _pcollections(v)
