"""Our transforms in a plain Beam pipeline: statistics, tf.Transform, training and a push, on the penguin data.

No pipeline root, no ML Metadata: `ReadExamples`, `SplitStatistics`, `AnalyzeAndTransform`,
`TrainModel` and `PushModel` are ordinary Beam PTransforms (the data ones over RecordBatches with
list-typed columns).

    python examples/own_beam_pipeline/pipeline.py tests/data/penguins_processed.csv /tmp/penguin-out
"""

from __future__ import annotations

import os
import sys

import apache_beam as beam
import tensorflow as tf
import tensorflow_data_validation as tfdv
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from examples.own_beam_pipeline.penguin_model import FEATURES, LABEL
from transforms._fn_args import FnArgs
from transforms.example_gen import ReadExamples
from transforms.push_model import PushModel
from transforms.statistics_gen import SplitStatistics
from transforms.train_model import TrainModel
from transforms.transform import AnalyzeAndTransform, WriteBatchesToTFRecord

MODEL_MODULE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "penguin_model.py")


def preprocessing_fn(inputs):
    # Columns arrive as lists (SparseTensors here); every row has one value of each.
    dense = {name: tf.reshape(tf.sparse.to_dense(value), [-1, 1]) for name, value in inputs.items()}
    outputs = {name: tft.scale_to_z_score(dense[name]) for name in FEATURES}
    outputs[LABEL] = tf.reshape(dense[LABEL], [-1])
    return outputs


def run(csv_path: str, out_dir: str, beam_args: list[str] | None = None, train_steps: int = 200) -> None:
    read = ReadExamples(csv_path, splits={"train": 3, "eval": 1})  # column types are found here
    fn_args = FnArgs(
        train_files=[os.path.join(out_dir, "train", "*.gz")],
        eval_files=[os.path.join(out_dir, "eval", "*.gz")],
        transform_output=os.path.join(out_dir, "transform_fn"),
        serving_model_dir=os.path.join(out_dir, "model"),
        model_run_dir=os.path.join(out_dir, "logs"),
        train_steps=train_steps,
        eval_steps=5,
    )
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
        written = [transform_fn | tft_beam.WriteTransformFn(fn_args.transform_output)]
        for split, split_batches in transformed.items():
            prefix = os.path.join(out_dir, split, "part")
            written.append(split_batches | f"Write{split}" >> WriteBatchesToTFRecord(prefix, file_name_suffix=".gz"))
        # Training starts once every file it reads is written: the writes are side inputs of its input.
        _ = (
            p
            | beam.Create([fn_args])
            | "AfterWrites" >> beam.Map(lambda args, *_: args, *[beam.pvalue.AsList(w) for w in written])
            | TrainModel(MODEL_MODULE)
            | beam.Map(lambda summary: summary["serving_model_dir"])
            | PushModel(os.path.join(out_dir, "serving"))
            | beam.Map(lambda pushed: print(f"pushed {pushed['model_dir']} as {pushed['pushed_destination']}"))
        )


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3:])
