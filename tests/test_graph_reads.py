"""How bulk data reaches a gated consumer: read back from the producer's committed Parquet, split by split.

A shuffle of the batches themselves (the old commit gate) made Beam's in-process runner hold a whole
split between stages, so memory grew with the data; these tests pin the graph shape that streams.
"""

from __future__ import annotations

import dataclasses
import re

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline import artifact_io, launcher
from beam_pipeline.errors import InputDataError
from examples.chicago_taxi.pipeline import create_pipeline
from tests.helpers import in_process_pipeline, run_components
from transforms.example_gen import ExampleGen


def _labels(compiled) -> list[str]:
    out = []

    def walk(node):
        out.append(node.full_label)
        for part in node.parts:
            walk(part)

    walk(compiled.beam_pipeline.transforms_stack[0])
    return out


def test_gated_consumers_read_committed_files_not_a_shuffle_of_batches(tmp_path, taxi_small_csv):
    compiled = launcher.compile_run(create_pipeline(pipeline_root=str(tmp_path), data_path=taxi_small_csv))
    labels = _labels(compiled)
    reads = sorted(label.rsplit("/", 1)[-1] for label in labels if ".Read[" in label and label.endswith(("]", "#2")))
    # Transform analyzes train and transforms train and eval: train is read twice (analysis, then the
    # transform after it), each a stream from the files; the Evaluator reads only its split; the
    # Trainer reads its files with tf.data, so the graph reads none for it.
    assert reads == [
        "Evaluator.examples.Read[eval]",
        "Transform.examples.Read[eval]",
        "Transform.examples.Read[train]",
        "Transform.examples.Read[train]#2",
    ]
    assert not [label for label in labels if ".examples." in label and "Barrier" in label]
    assert not [label for label in labels if label.startswith("Trainer.examples")]


@pytest.fixture(scope="module")
def examples(tmp_path_factory, taxi_small_csv):
    root = tmp_path_factory.mktemp("reads")
    return run_components(root, [ExampleGen(input_base=taxi_small_csv)]).artifact("ExampleGen", "examples")


def test_read_split_streams_one_split_of_a_committed_artifact(examples):
    p = in_process_pipeline()
    rows = (
        p
        | beam.Create([examples])
        | artifact_io.ReadSplit("eval")
        | beam.Map(lambda batch: batch.num_rows)
        | beam.CombineGlobally(sum)
    )
    assert_that(rows, equal_to([examples.properties["row_counts"]["eval"]]))
    p.run().wait_until_finish()


@pytest.mark.parametrize(
    "change, split, message",
    [
        ({"payload_format": "tfrecord_gzip"}, "eval", "are 'tfrecord_gzip'; only Parquet examples are read back"),
        ({}, "test", "have no split 'test'; splits are ['train', 'eval']"),
    ],
)
def test_read_split_refuses_what_it_cannot_read(examples, change, split, message):
    artifact = dataclasses.replace(examples, properties={**examples.properties, **change})
    p = in_process_pipeline()
    _ = p | beam.Create([artifact]) | artifact_io.ReadSplit(split)
    # The in-process runner re-raises the DoFn's own error type, naming the artifact.
    with pytest.raises(InputDataError, match=re.escape(f"examples at {examples.uri} {message}")):
        p.run().wait_until_finish()
