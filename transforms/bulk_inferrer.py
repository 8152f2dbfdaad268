"""BulkInferrer: a model's predictions over Examples, in the graph, as Parquet with the prediction columns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, INFERENCE_RESULT, MODEL, MODEL_BLESSING, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import InputDataError, PipelineDefinitionError
from transforms._tf_examples import serialize_rows

SERVING_MODEL_DIR = "Format-Serving"
MAX_BATCH_ROWS = 2048  # one signature call per this many rows


class PredictBatches(beam.PTransform):
    """Append the outputs of a SavedModel's signature to each RecordBatch, one column per output.

    Usable in any Beam pipeline; BulkInferrer adds the artifact and the blessing check. Example::

        scored = batches | PredictBatches("/models/taxi/1")  # adds "scores" from the from_examples signature

    The signature takes serialized tf.Examples (one per row, from the batch's columns); each output
    `[rows]` or `[rows, k]` becomes a large_list column of that name (an output named like an input
    column is an error). The model is loaded once per DoFn instance, on its first batch.
    """

    def __init__(self, model_path: str, *, signature: str = "from_examples"):
        super().__init__()
        self._model_path, self._signature = model_path, signature

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return batches | "Predict" >> beam.ParDo(_Predict(self._model_path, self._signature))


class _Predict(beam.DoFn):
    def __init__(self, model_path: str, signature: str):
        self._path, self._signature = model_path, signature
        self._fn: Any = None

    def _load(self) -> None:
        import tensorflow as tf
        from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

        loaded = tf.saved_model.load(self._path)
        if self._signature not in loaded.signatures:
            raise InputDataError(
                f"model {self._path} has no signature {self._signature!r}; it has {sorted(loaded.signatures)}"
            )
        fn = loaded.signatures[self._signature]
        names = list(fn.structured_input_signature[1])
        if len(names) != 1:
            raise InputDataError(
                f"signature {self._signature!r} of {self._path} takes {names}; expected one input of serialized "
                "tf.Examples"
            )
        self._loaded, self._fn, self._input = loaded, fn, names[0]
        self._encoder = RecordBatchToExamplesEncoder()

    def process(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        import tensorflow as tf

        if self._fn is None:
            self._load()
        for start in range(0, batch.num_rows, MAX_BATCH_ROWS):
            part = batch.slice(start, MAX_BATCH_ROWS)
            outputs = self._fn(**{self._input: tf.constant(serialize_rows(self._encoder, part))})
            columns, names = list(part.columns), list(part.schema.names)
            for name in sorted(outputs):
                if name in names:
                    raise InputDataError(f"model output {name!r} has the name of an input column; rename one")
                columns.append(_as_list_column(outputs[name].numpy(), name))
                names.append(name)
            yield pa.RecordBatch.from_arrays(columns, names=names)


def _as_list_column(values: np.ndarray, name: str) -> pa.Array:
    """`[rows]` or `[rows, k]` → large_list column, k values per row."""
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise InputDataError(f"model output {name!r} has shape {values.shape}; expected [rows] or [rows, k]")
    rows, width = values.shape
    flat = values.reshape(-1)
    if flat.dtype.kind == "f":
        flat = flat.astype(np.float32)
    elif flat.dtype.kind in "iub":
        flat = flat.astype(np.int64)
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int64))
    return pa.LargeListArray.from_arrays(offsets, pa.array(flat))


class BulkInferrer(Component):
    """Predict with `model` over `examples` (the splits in `splits`, default all), when blessed.

    With `model_blessing`, a model that is not blessed predicts nothing: the inference result is
    committed with `skipped=1` and the blessing's reason, and no split. Output `inference_result`:
    Parquet per split (`Split-<name>/`), the input columns plus one column per output of the
    model's `signature` (the taxi model's `from_examples` gives `scores`).
    """

    INPUTS = {
        "examples": InputSpec(EXAMPLES),
        "model": InputSpec(MODEL),
        "model_blessing": InputSpec(MODEL_BLESSING, optional=True),
    }
    OUTPUTS = {"inference_result": INFERENCE_RESULT}

    def __init__(
        self,
        *,
        examples: Channel,
        model: Channel,
        model_blessing: Channel | None = None,
        splits: Sequence[str] | None = None,
        signature: str = "from_examples",
        component_id: str | None = None,
    ):
        super().__init__(
            inputs={"examples": examples, "model": model, "model_blessing": model_blessing},
            params={"splits": list(splits) if splits else None, "signature": signature},
            component_id=component_id,
        )

    def splits_read(self, name: str, splits: Sequence[str]) -> list[str]:
        wanted = self.params["splits"]
        return [s for s in splits if wanted is None or s in wanted]

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        known = input_static["examples"].get("splits")
        missing = [s for s in self.params["splits"] or [] if known is not None and s not in known]
        if missing:
            raise PipelineDefinitionError(f"{self.id}: splits {missing} are not in the examples' splits {known}")
        return {"inference_result": {"payload_format": artifact_io.PARQUET}}

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        model_path = artifact_io.join(ctx.input_uris["model"], SERVING_MODEL_DIR)
        uri = ctx.output_uri("inference_result")
        gates = {"model": beam.pvalue.AsSingleton(ctx.committed_inputs["model"])}
        if "model_blessing" in inputs:
            gates["blessing"] = beam.pvalue.AsSingleton(ctx.committed_inputs["model_blessing"])
        written = []
        splits = sorted(inputs["examples"])
        for split in splits:
            admitted = inputs["examples"][split] | f"{split}.IfBlessed" >> beam.FlatMap(_if_blessed, **gates)
            scored = admitted | f"{split}.Predict" >> PredictBatches(model_path, signature=self.params["signature"])
            prefix = artifact_io.join(uri, f"Split-{split}", "part")
            written.append(scored | f"{split}.Write" >> artifact_io.WriteBatchesToParquet(prefix))
        files = written | "AllWritten" >> beam.Flatten()
        start = ctx.committed_inputs["model"].pipeline | "Start" >> beam.Create([None])
        properties = start | "Properties" >> beam.Map(_properties, splits, beam.pvalue.AsList(files), **gates)
        ctx.publish("inference_result", properties)
        return {}


def _if_blessed(batch: pa.RecordBatch, model: Artifact, blessing: Artifact | None = None) -> list[pa.RecordBatch]:
    return [batch] if blessing is None or _blessed(blessing) else []


def _blessed(blessing: Artifact) -> bool:
    return int(blessing.properties.get("blessed", 0)) == 1


def _properties(
    _: None, splits: list[str], _written: list[str], model: Artifact, blessing: Artifact | None = None
) -> dict[str, Any]:
    """Once every split's files are written (`_written` only orders this after them)."""
    if blessing is not None and not _blessed(blessing):
        why = blessing.properties.get("blessing_message") or "the blessing says blessed=0"
        return {"skipped": 1, "skip_reason": f"model {model.uri} is not blessed: {why}", "model_uri": model.uri,
                "split_names": [], "payload_format": artifact_io.PARQUET}  # fmt: skip
    return {"skipped": 0, "model_uri": model.uri, "split_names": splits, "payload_format": artifact_io.PARQUET}
