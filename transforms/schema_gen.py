"""SchemaGen (infer from train statistics) and ImportSchemaGen (a user-curated schema.pbtxt)."""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import SCHEMA, STATISTICS
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import InputDataError


def _write_schema(component: Component, schema_pcoll):
    uri = component.ctx.output_uri("schema")
    written = schema_pcoll | "Write" >> artifact_io.WriteProto(artifact_io.join(uri, artifact_io.SCHEMA_FILE))
    component.ctx.publish("schema", written | "Properties" >> beam.Map(lambda _: {}))
    return {"schema": schema_pcoll}


class SchemaGen(Component):
    """Infer a schema from the statistics of one split (default: train)."""

    INPUTS = {"statistics": InputSpec(STATISTICS)}
    OUTPUTS = {"schema": SCHEMA}

    def __init__(
        self,
        *,
        statistics: Channel,
        infer_feature_shape: bool = False,
        split: str = "train",
        component_id: str | None = None,
    ):
        super().__init__(
            inputs={"statistics": statistics},
            params={"infer_feature_shape": infer_feature_shape, "split": split},
            component_id=component_id,
        )

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {"schema": {"schema": None}}

    def expand(self, inputs):
        import tensorflow_data_validation as tfdv

        split = self.params["split"]
        if split not in inputs["statistics"]:
            raise InputDataError(
                f"{self.id}: no statistics for split {split!r}; splits are {sorted(inputs['statistics'])}"
            )
        schema = inputs["statistics"][split] | "Infer" >> beam.Map(
            tfdv.infer_schema, infer_feature_shape=self.params["infer_feature_shape"]
        )
        return _write_schema(self, schema)


class ImportSchemaGen(Component):
    """Use a curated schema file; its content is known when the graph is built (and in the cache key)."""

    OUTPUTS = {"schema": SCHEMA}

    def __init__(self, *, schema_file: str, component_id: str | None = None):
        super().__init__(inputs={}, params={"schema_file": schema_file}, component_id=component_id)

    def module_files(self) -> list[str]:
        return [self.params["schema_file"]]

    def load(self):
        from google.protobuf import text_format
        from tensorflow_metadata.proto.v0 import schema_pb2

        path = self.params["schema_file"]
        try:
            text = artifact_io.read_bytes(path).decode()
        except Exception as e:
            raise InputDataError(f"schema file {path!r} cannot be read: {e}") from None
        try:
            return text_format.Parse(text, schema_pb2.Schema())
        except text_format.ParseError as e:
            raise InputDataError(f"{path}: not a text-format tensorflow_metadata Schema: {e}") from None

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {"schema": {"schema": self.load()}}

    def expand(self, pbegin):
        return _write_schema(self, pbegin | "Schema" >> beam.Create([self.load()]))
