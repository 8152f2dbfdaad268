"""Transform: tf.Transform on RecordBatches of the examples (analyze some splits, transform all).

The user's `preprocessing_fn` is traced once at compile time against the input schema: a missing
module or function, a function that raises, or a column it reads that the data lacks is reported
before anything runs, and the traced outputs give the transformed Arrow schema downstream
components need while the graph is built.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from tensorflow_metadata.proto.v0 import schema_pb2

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, SCHEMA, TRANSFORM_GRAPH
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import (
    BeamPipelineError,
    InputDataError,
    PipelineDefinitionError,
    UserModuleError,
)
from transforms import _user_module
from transforms._analyzer_cache import CACHE_DIR, AnalyzerCache, analyze_with_cache, dataset_keys, plan_cache
from transforms._tfrecord_batches import WriteBatchesToTFRecord

PAYLOAD_FORMAT = "tfrecord_gzip"
# Transformed examples are files `<uri>/Split-<split>/<DATA_PREFIX>-?????-of-?????.gz`.
DATA_PREFIX = "transformed_examples"
TEMP_DIR = ".tft_temp"

_ARROW_TO_FEATURE_TYPE = {
    pa.int64(): schema_pb2.INT,
    pa.float32(): schema_pb2.FLOAT,
    pa.float64(): schema_pb2.FLOAT,
    pa.binary(): schema_pb2.BYTES,
    pa.large_binary(): schema_pb2.BYTES,
    pa.string(): schema_pb2.BYTES,
    pa.large_string(): schema_pb2.BYTES,
}


def schema_from_arrow(arrow_schema: pa.Schema) -> schema_pb2.Schema:
    """Every column as a VarLen feature: what TFX gives for features that may be missing."""
    schema = schema_pb2.Schema()
    for field in arrow_schema:
        is_list = pa.types.is_large_list(field.type) or pa.types.is_list(field.type)
        value_type = field.type.value_type if is_list else None
        if value_type not in _ARROW_TO_FEATURE_TYPE:
            raise InputDataError(
                f"column {field.name!r} has Arrow type {field.type}; expected a list of int64, float32 or binary"
            )
        schema.feature.add(name=field.name, type=_ARROW_TO_FEATURE_TYPE[value_type])
    return schema


def input_schema(arrow_schema: pa.Schema, curated: schema_pb2.Schema | None) -> schema_pb2.Schema:
    """The schema tf.Transform reads the data with: the curated one restricted to columns present, else VarLen."""
    if curated is None:
        return schema_from_arrow(arrow_schema)
    inferred = {f.name: f.type for f in schema_from_arrow(arrow_schema).feature}
    schema = schema_pb2.Schema()
    schema.CopyFrom(curated)
    del schema.feature[:]
    for feature in curated.feature:
        if feature.name not in inferred:
            continue
        if feature.type != inferred[feature.name]:
            raise InputDataError(
                f"column {feature.name!r}: the schema says {schema_pb2.FeatureType.Name(feature.type)}, "
                f"the examples hold {schema_pb2.FeatureType.Name(inferred[feature.name])}"
            )
        schema.feature.add().CopyFrom(feature)
    schema.ClearField("tensor_representation_group")
    return schema


def tensor_adapter_config(arrow_schema: pa.Schema, schema: schema_pb2.Schema) -> Any:
    from tfx_bsl.tfxio import tensor_adapter, tensor_representation_util

    reps = tensor_representation_util.InferTensorRepresentationsFromSchema(schema)
    return tensor_adapter.TensorAdapterConfig(arrow_schema, reps)


class _Columns(dict):
    """The inputs dict handed to preprocessing_fn: reading an absent column names it."""

    def __init__(self, values: Mapping[str, Any], module_file: str):
        super().__init__(values)
        self._module_file = module_file

    def __missing__(self, key: str) -> Any:
        raise InputDataError(
            f"Transform: preprocessing_fn in {self._module_file} reads column {key!r}, "
            f"which the examples do not have; columns are {sorted(self)}"
        )


def guarded_preprocessing_fn(fn: Callable, module_file: str) -> Callable:
    """Wrap the user's function so its failures say which module failed and why."""

    def preprocessing_fn(inputs: Mapping[str, Any]) -> dict[str, Any]:
        try:
            outputs = fn(_Columns(inputs, module_file))
        except BeamPipelineError:
            raise
        except Exception as e:
            raise UserModuleError(f"Transform: preprocessing_fn in {module_file} raised {type(e).__name__}: {e}") from e
        if not isinstance(outputs, Mapping) or not outputs:
            raise UserModuleError(
                f"Transform: preprocessing_fn in {module_file} must return a non-empty dict of tensors, "
                f"got {type(outputs).__name__}"
            )
        return dict(outputs)

    return preprocessing_fn


def trace_output_arrow_schema(preprocessing_fn: Callable, schema: schema_pb2.Schema) -> pa.Schema:
    """Trace preprocessing_fn (analyzers unevaluated) and return the Arrow schema TFT will output."""
    from tensorflow_transform import impl_helper, schema_inference
    from tensorflow_transform.tf_metadata import schema_utils

    feature_spec = schema_utils.schema_as_feature_spec(schema).feature_spec
    type_specs = impl_helper.get_type_specs_from_feature_specs(feature_spec)
    with tempfile.TemporaryDirectory() as tmp:
        graph, _, outputs = impl_helper.trace_preprocessing_function(
            preprocessing_fn, type_specs, use_tf_compat_v1=False, base_temp_dir=tmp
        )
        output_schema = schema_inference.infer_feature_schema(outputs, graph)
    return impl_helper.make_tensor_to_arrow_converter(output_schema).arrow_schema()


class AnalyzeAndTransform(beam.PTransform):
    """tf.Transform over RecordBatches: fit `preprocessing_fn` on some splits, apply it to others.

    Usable in any Beam pipeline; the Transform component adds only the artifact wiring. Example::

        with beam.Pipeline() as p:
            batches = {"train": p | "Train" >> beam.Create(train), "eval": p | "Eval" >> beam.Create(evals)}
            transform_fn, transformed = batches | AnalyzeAndTransform(
                preprocessing_fn, train[0].schema, temp_dir="/tmp/tft"
            )
            _ = transform_fn | tft_beam.WriteTransformFn("/tmp/transform_fn")
            # transformed["eval"]: PCollection[RecordBatch] of preprocessing_fn's outputs

    Input: `{split: PCollection[RecordBatch]}` with list-typed columns (`arrow_schema`). `schema`,
    a tf.metadata Schema, says how tf.Transform reads the columns (default: every one VarLen).
    Output: `(transform_fn, {split: PCollection[RecordBatch]})` for `transform_splits` (default: all
    the input's splits). An analyzed split is consumed twice, by the analysis and then by its
    transform, which needs the analysis first; `second_reads` may give an independent read of it
    for the transform, so that a runner which buffers between stages need not hold the whole split.
    With `analyzer_cache` (`_analyzer_cache.plan_cache`) the analysis reads its datasets (one per
    span) instead of the splits, reuses what the cache holds, and writes the cache (`cache_writes`).
    """

    def __init__(
        self,
        preprocessing_fn: Callable,
        arrow_schema: pa.Schema,
        schema: schema_pb2.Schema | None = None,
        *,
        analyze_splits: Sequence[str] = ("train",),
        transform_splits: Sequence[str] | None = None,
        temp_dir: str,
        second_reads: Mapping[str, beam.PCollection] | None = None,
        analyzer_cache: AnalyzerCache | None = None,
    ):
        super().__init__()
        self.cache_writes: list[beam.PCollection] = []  # the analyzer cache's writes, once expanded
        if not analyze_splits:
            raise PipelineDefinitionError("AnalyzeAndTransform: analyze_splits must name at least one split")
        if not temp_dir:
            raise PipelineDefinitionError("AnalyzeAndTransform: temp_dir must name where tf.Transform may write")
        self._fn, self._arrow_schema = preprocessing_fn, arrow_schema
        self._schema = schema if schema is not None else schema_from_arrow(arrow_schema)
        self._analyze = list(analyze_splits)
        self._transform = list(transform_splits) if transform_splits is not None else None
        self._temp_dir, self._second_reads = temp_dir, dict(second_reads or {})
        self._cache = analyzer_cache

    def expand(self, batches: Mapping[str, beam.PCollection]) -> tuple[Any, dict[str, beam.PCollection]]:
        import tensorflow_transform.beam as tft_beam

        transform = self._transform if self._transform is not None else list(batches)
        missing = sorted(set(self._analyze) - set(batches)) + sorted(set(transform) - set(batches))
        if missing:
            raise PipelineDefinitionError(f"AnalyzeAndTransform: splits {missing} are not among {sorted(batches)}")
        config = tensor_adapter_config(self._arrow_schema, self._schema)
        outputs = {}
        with tft_beam.Context(temp_dir=self._temp_dir):
            if self._cache is not None:
                pipeline = next(iter(batches.values())).pipeline
                transform_fn, self.cache_writes = analyze_with_cache(self._cache, self._fn, config, pipeline)
            else:
                to_analyze = [batches[s] for s in self._analyze] | "AnalyzeSplits" >> beam.Flatten()
                transform_fn = (to_analyze, config) | "Analyze" >> tft_beam.AnalyzeDataset(self._fn)
            for split in transform:
                data = self._second_reads.get(split, batches[split])
                transformed, _ = ((data, config), transform_fn) | f"Transform[{split}]" >> (
                    tft_beam.TransformDataset(output_record_batches=True)
                )
                outputs[split] = transformed | f"Batches[{split}]" >> beam.Map(lambda pair: pair[0])
        return transform_fn, outputs


class Transform(Component):
    """tf.Transform: fit on `analyze_splits`, apply to every split (or `transform_splits`).

    Outputs: `transform_graph`, the WriteTransformFn directory (plus the raw schema under
    `metadata/`), and `transformed_examples`, `{split: PCollection[RecordBatch]}` in the graph and,
    when `materialize` is set, gzip TFRecords of tf.train.Example under `<uri>/Split-<split>/`.
    """

    INPUTS = {"examples": InputSpec(EXAMPLES), "schema": InputSpec(SCHEMA)}
    OUTPUTS = {"transform_graph": TRANSFORM_GRAPH, "transformed_examples": EXAMPLES}

    def __init__(
        self,
        *,
        examples: Channel,
        schema: Channel,
        module_file: str,
        analyze_splits: Sequence[str] = ("train",),
        transform_splits: Sequence[str] | None = None,
        materialize: bool = True,
        disable_analyzer_cache: bool = False,
        component_id: str | None = None,
    ):
        if not analyze_splits:
            raise PipelineDefinitionError("Transform: analyze_splits must name at least one split")
        super().__init__(
            inputs={"examples": examples, "schema": schema},
            params={
                "module_file": module_file,
                "analyze_splits": list(analyze_splits),
                "transform_splits": list(transform_splits) if transform_splits is not None else None,
                "materialize": materialize,
                "disable_analyzer_cache": disable_analyzer_cache,
            },
            component_id=component_id,
        )
        self._load_fn()

    def _load_fn(self, module_file: str | None = None) -> Callable:
        """The guarded preprocessing_fn of `module_file` (default: the configured path)."""
        module_file = module_file or self.params["module_file"]
        module = _user_module.load_module(module_file, ["preprocessing_fn"], self.id)
        return guarded_preprocessing_fn(module.preprocessing_fn, module_file)

    def _splits(self, available: Sequence[str]) -> tuple[list[str], list[str]]:
        analyze = self.params["analyze_splits"]
        transform = self.params["transform_splits"] or list(available)
        unknown = sorted(set(analyze) - set(available)) + sorted(set(transform) - set(available))
        if unknown:
            raise PipelineDefinitionError(
                f"{self.id}: splits {unknown} are not in the examples' splits {list(available)}"
            )
        return list(analyze), list(transform)

    def cache_config(self) -> dict[str, Any]:
        """Without the analyzer cache switch: it changes how the analysis runs, not its result."""
        return {k: v for k, v in self.exec_properties().items() if k != "disable_analyzer_cache"}

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """The analyzer cache of this Transform's newest graph: a hint (the result is the same without it)."""
        if self.params["disable_analyzer_cache"]:
            return {}
        for graph in store.latest_artifacts(TRANSFORM_GRAPH.name, pipeline_name, {"producer_component": self.id}):
            if graph.properties.get("analyzer_cache"):
                return {"previous_analyzer_cache": FileSystems.join(graph.uri, CACHE_DIR)}
        return {}

    def _analyzer_cache(self, fn: Callable, arrow_schema: pa.Schema, schema: Any, analyze: list[str]):
        """With examples over spans: each span of the analyzed splits a dataset of TFT's analyzer cache."""
        static = self.ctx.input_static["examples"]
        committed = self.ctx.committed_inputs.get("examples")
        if self.params["disable_analyzer_cache"] or not static.get("span_fingerprints") or committed is None:
            return None
        keys = dataset_keys(analyze, static["span_fingerprints"], static["config_digest"])

        def read(split: str, span: int) -> beam.PCollection:
            return committed | f"ReadSpan[{split}][{span}]" >> artifact_io.ReadSplit(split, span)

        return plan_cache(
            committed.pipeline,
            fn,
            tensor_adapter_config(arrow_schema, schema),
            keys,
            read,
            self.ctx.resolved.get("previous_analyzer_cache"),
            FileSystems.join(self.ctx.output_uri("transform_graph"), CACHE_DIR),
        )

    def splits_read(self, name: str, splits: Sequence[str]) -> list[str]:
        analyze, transform = self._splits(splits)
        return [s for s in splits if s in analyze or s in transform]

    def _input_schema(self, input_static: Mapping[str, Mapping[str, Any]]) -> schema_pb2.Schema:
        curated = input_static.get("schema", {}).get("schema")
        return input_schema(input_static["examples"]["arrow_schema"], curated)

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        _, transform = self._splits(input_static["examples"]["splits"])
        arrow_schema = trace_output_arrow_schema(self._load_fn(), self._input_schema(input_static))
        return {
            "transform_graph": {},
            "transformed_examples": {
                "arrow_schema": arrow_schema,
                "splits": transform,
                "payload_format": PAYLOAD_FORMAT if self.params["materialize"] else None,
            },
        }

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import dataset_metadata

        examples = inputs["examples"]
        analyze, transform = self._splits(self.ctx.input_static["examples"]["splits"])
        schema = self._input_schema(self.ctx.input_static)
        graph_uri = self.ctx.output_uri("transform_graph")
        data_uri = self.ctx.output_uri("transformed_examples")
        temp_dir = FileSystems.join(graph_uri, TEMP_DIR)
        pipeline = next(iter(examples.values())).pipeline
        # An analyzed split is read again rather than held for its transform.
        arrow_schema = self.ctx.input_static["examples"]["arrow_schema"]
        fn = self._load_fn(self.ctx.module_file("module_file", self.params["module_file"]))
        with tft_beam.Context(temp_dir=temp_dir):
            cache = self._analyzer_cache(fn, arrow_schema, schema, analyze)
        # An analyzed split is read again rather than held for its transform (not read at all for the
        # analysis when the analyzer cache reads it by span).
        again = {} if cache else {s: self.ctx.read_again("examples", s, examples[s]) for s in analyze if s in transform}
        analyze_and_transform = AnalyzeAndTransform(
            fn,
            arrow_schema,
            schema,
            analyze_splits=analyze,
            transform_splits=transform,
            temp_dir=temp_dir,
            second_reads=again,
            analyzer_cache=cache,
        )
        transform_fn, outputs = examples | "AnalyzeAndTransform" >> analyze_and_transform
        with tft_beam.Context(temp_dir=temp_dir):
            written = [
                transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(graph_uri),
                dataset_metadata.DatasetMetadata(schema)
                | "WriteRawMetadata" >> tft_beam.WriteMetadata(FileSystems.join(graph_uri, "metadata"), pipeline),
                *analyze_and_transform.cache_writes,
            ]
        counts = []
        for split, batches in outputs.items():
            counts.append(
                batches
                | f"Count[{split}]" >> beam.Map(lambda b, s=split: (s, b.num_rows))
                | f"Sum[{split}]" >> beam.CombinePerKey(sum)
            )
            if self.params["materialize"]:
                written.append(
                    batches
                    | f"Write[{split}]"
                    >> WriteBatchesToTFRecord(
                        FileSystems.join(data_uri, f"Split-{split}", DATA_PREFIX),
                        file_name_suffix=".gz",
                        compression_type=beam.io.filesystem.CompressionTypes.GZIP,
                    )
                )

        # TransformDataset reads the transform_fn from the temp dir: remove it only after every write.
        done = (
            pipeline
            | "Finish" >> beam.Create([None])
            | "RemoveTemp"
            >> beam.Map(
                _finish,
                temp_dir=temp_dir,
                written=beam.pvalue.AsList(written | "AllWritten" >> beam.Flatten()),
                counts=beam.pvalue.AsDict(counts | "AllCounts" >> beam.Flatten()),
            )
        )
        materialized = self.params["materialize"]
        graph_properties = {"analyzer_cache": True, "analyzer_cache_reused": cache.reused} if cache is not None else {}
        self.ctx.publish("transform_graph", done | "GraphProperties" >> beam.Map(lambda _, p=graph_properties: p))
        self.ctx.publish(
            "transformed_examples",
            done
            | "ExamplesProperties"
            >> beam.Map(
                lambda counts, splits=tuple(transform): {
                    "split_names": list(splits),
                    "row_counts": {s: counts.get(s, 0) for s in splits},
                    "payload_format": PAYLOAD_FORMAT if materialized else None,
                }
            ),
        )
        return {"transformed_examples": outputs}


def _finish(_: Any, temp_dir: str, written: list[Any], counts: dict[str, int]) -> dict[str, int]:
    import tensorflow as tf

    # tf.io.gfile sees an object-store prefix as a directory (Beam's FileSystems.exists does not).
    if tf.io.gfile.exists(temp_dir):
        tf.io.gfile.rmtree(temp_dir)
    return counts
