"""Our data transforms in a plain Beam pipeline: statistics and tf.Transform on the penguin data.

No pipeline root, no ML Metadata: `ReadExamples`, `SplitStatistics` and `AnalyzeAndTransform` are
ordinary Beam PTransforms over RecordBatches with list-typed columns.

    python examples/own_beam_pipeline/pipeline.py tests/data/penguins_processed.csv /tmp/penguin-out
"""

from __future__ import annotations

import os
import sys

import apache_beam as beam
import tensorflow_data_validation as tfdv
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from transforms.example_gen import ReadExamples
from transforms.statistics_gen import SplitStatistics
from transforms.transform import AnalyzeAndTransform


def preprocessing_fn(inputs):
    return {"culmen_z": tft.scale_to_z_score(inputs["culmen_length_mm"]), "species": inputs["species"]}


def run(csv_path: str, out_dir: str, beam_args: list[str] | None = None) -> None:
    read = ReadExamples(csv_path, splits={"train": 3, "eval": 1})  # column types are found here
    with beam.Pipeline(argv=beam_args or []) as p:
        batches = p | read  # {"train": PCollection[RecordBatch], "eval": ...}, split by a hash of each row
        _ = (
            batches["train"]
            | SplitStatistics("train")
            | beam.Map(tfdv.write_stats_text, os.path.join(out_dir, "train_stats.pbtxt"))
        )
        transform_fn, transformed = batches | AnalyzeAndTransform(
            preprocessing_fn, read.arrow_schema, temp_dir=os.path.join(out_dir, "tmp")
        )
        _ = transform_fn | tft_beam.WriteTransformFn(os.path.join(out_dir, "transform_fn"))
        _ = (
            transformed["eval"]
            | beam.Map(lambda batch: batch.num_rows)
            | beam.CombineGlobally(sum)
            | beam.Map(lambda rows: print(f"eval rows transformed: {rows}"))
        )


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3:])
