"""StatisticsGen: TFDV statistics of RecordBatches, per split (`SplitStatistics` is the data work alone)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, STATISTICS
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineDefinitionError


class SplitStatistics(beam.PTransform):
    """TFDV statistics of one split's RecordBatches: a PCollection holding one DatasetFeatureStatisticsList.

    Usable in any Beam pipeline; StatisticsGen adds only the artifact wiring. Example::

        stats = batches | SplitStatistics("train", slice_features=["payment_type"])
        # one proto: datasets[0] is the whole split (named "train"), then one dataset per slice

    Runs TFDV's sliced-statistics transform (the core of `tfdv.GenerateStatistics`, with the same
    generators and protos) on `(slice key, RecordBatch)` pairs made here: the whole split, plus one
    slice per value of `slice_features`, and rows sampled at `sample_rate` (tfdv's own option
    samples whole batches, and a batch here is a whole block of the input).
    """

    def __init__(
        self,
        split: str,
        *,
        num_top_values: int = 20,
        slice_features: Sequence[str] = (),
        sample_rate: float | None = None,
    ):
        super().__init__()
        _check_sample_rate(sample_rate)
        self._split, self._top = split, num_top_values
        self._slice_features, self._sample_rate = list(slice_features), sample_rate

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        import tensorflow_data_validation as tfdv
        from tensorflow_data_validation.statistics import stats_impl

        options = tfdv.StatsOptions(num_top_values=self._top)
        return (
            batches
            | "Slice" >> beam.FlatMap(_slices, self._slice_features, self._sample_rate)
            | "Stats" >> stats_impl.GenerateSlicedStatisticsImpl(options, is_slicing_enabled=True)
            | "Name" >> beam.Map(_name_split, self._split)
        )


class StatisticsGen(Component):
    """TFDV statistics per split (`SplitStatistics`); output `{split: PCollection[DatasetFeatureStatisticsList]}`."""

    INPUTS = {"examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"statistics": STATISTICS}
    # A pass over batches already in memory that rarely fails: fusing it with ExampleGen saves
    # materializing every RecordBatch at a barrier (3 of 8 s at 510k rows, benchmarks/RESULTS.md).
    FUSE_WITH_PRODUCERS = True
    VERSION = "2"

    def __init__(
        self,
        *,
        examples: Channel,
        sample_rate: float | None = None,
        num_top_values: int = 20,
        slice_features: Sequence[str] = (),
        component_id: str | None = None,
    ):
        _check_sample_rate(sample_rate)
        super().__init__(
            inputs={"examples": examples},
            params={
                "sample_rate": sample_rate,
                "num_top_values": num_top_values,
                "slice_features": list(slice_features),
            },
            component_id=component_id,
        )

    def expand(self, inputs):
        uri = self.ctx.output_uri("statistics")
        batches = inputs["examples"]
        splits = list(batches)
        out, written = {}, []
        for split, b in batches.items():
            stats = b | f"Stats[{split}]" >> SplitStatistics(
                split,
                num_top_values=self.params["num_top_values"],
                slice_features=self.params["slice_features"],
                sample_rate=self.params["sample_rate"],
            )
            out[split] = stats
            written.append(
                stats
                | f"Write[{split}]"
                >> artifact_io.WriteProto(artifact_io.split_file(uri, split, artifact_io.STATS_FILE))
            )
        properties = (
            written
            | "Written" >> beam.Flatten()
            | "Count" >> beam.combiners.Count.Globally()
            | "Properties" >> beam.Map(lambda _: {"split_names": splits})
        )
        self.ctx.publish("statistics", properties)
        return {"statistics": out}


def _check_sample_rate(sample_rate: float | None) -> None:
    if sample_rate is not None and not 0 < sample_rate <= 1:
        raise PipelineDefinitionError(f"StatisticsGen sample_rate={sample_rate}: expected 0 < rate <= 1")


def _slices(
    batch: pa.RecordBatch, slice_features: Sequence[str], sample_rate: float | None
) -> Iterator[tuple[str, pa.RecordBatch]]:
    from tensorflow_data_validation import constants

    if sample_rate is not None and sample_rate < 1:
        # Rows, not whole batches (what tfdv's own sample_rate drops): a batch here is a whole block.
        batch = batch.filter(pa.array(np.random.default_rng().random(batch.num_rows) < sample_rate))
    yield constants.DEFAULT_SLICE_KEY, batch
    if slice_features:
        from tensorflow_data_validation.utils import slicing_util

        yield from slicing_util.get_feature_value_slicer({f: None for f in slice_features})(batch)


def _name_split(stats, split: str):
    """The whole split's dataset is named after the split (as TFDV's views label it) and comes first."""
    from tensorflow_data_validation import constants
    from tensorflow_metadata.proto.v0 import statistics_pb2

    whole = [d for d in stats.datasets if d.name == constants.DEFAULT_SLICE_KEY]
    result = statistics_pb2.DatasetFeatureStatisticsList()
    first = result.datasets.add()
    if whole:
        first.CopyFrom(whole[0])
    first.name = split  # with no rows there is no dataset: an empty one, as tfdv gives for empty input
    for dataset in sorted(stats.datasets, key=lambda d: d.name):
        if dataset.name != constants.DEFAULT_SLICE_KEY:
            result.datasets.add().CopyFrom(dataset)
    return result
