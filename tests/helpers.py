"""Small helpers the tests share: run a list of components as a pipeline, read ML Metadata back."""

from __future__ import annotations

import os

from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

from beam_pipeline import Pipeline, launcher
from beam_pipeline.metadata import MetadataStore


def in_process_pipeline():
    """A bare Beam pipeline on the runner the launcher uses by default (never DirectRunner's Prism attempt)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from runners.options import in_process_runner

    options = PipelineOptions()
    return beam.Pipeline(runner=in_process_runner(options), options=options)


def run_components(root, components, name="test", beam_args=(), **kwargs):
    pipeline = Pipeline(name, str(root), components)
    return launcher.run(pipeline, list(beam_args), **kwargs)


def store_at(root) -> MetadataStore:
    return MetadataStore(os.path.join(str(root), "metadata.sqlite"))


def executions_by_state(store: MetadataStore) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in store.mlmd.get_executions():
        state = mlmd_pb2.Execution.State.Name(e.last_known_state)
        out.setdefault(state, []).append(e.properties["component_id"].string_value)
    return out
