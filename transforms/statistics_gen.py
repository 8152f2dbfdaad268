"""StatisticsGen: TFDV statistics per split, computed on the RecordBatches already in the graph."""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, STATISTICS
from beam_pipeline.dsl import Channel, Component, InputSpec


class StatisticsGen(Component):
    """`tfdv.GenerateStatistics` per split; output `{split: PCollection[DatasetFeatureStatisticsList]}`."""

    INPUTS = {"examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"statistics": STATISTICS}

    def __init__(
        self,
        *,
        examples: Channel,
        sample_rate: float | None = None,
        num_top_values: int = 20,
        slice_features: Sequence[str] = (),
        component_id: str | None = None,
    ):
        super().__init__(
            inputs={"examples": examples},
            params={
                "sample_rate": sample_rate,
                "num_top_values": num_top_values,
                "slice_features": list(slice_features),
            },
            component_id=component_id,
        )

    def stats_options(self):
        import tensorflow_data_validation as tfdv
        from tensorflow_data_validation.utils import slicing_util

        slicers = []
        if self.params["slice_features"]:
            slicers = [slicing_util.get_feature_value_slicer({f: None for f in self.params["slice_features"]})]
        return tfdv.StatsOptions(
            sample_rate=self.params["sample_rate"],
            num_top_values=self.params["num_top_values"],
            experimental_slice_functions=slicers or None,
        )

    def expand(self, inputs):
        import tensorflow_data_validation as tfdv

        uri = self.ctx.output_uri("statistics")
        options = self.stats_options()
        out, written = {}, []
        for split, batches in inputs["examples"].items():
            stats = (
                batches
                | f"Stats[{split}]" >> tfdv.GenerateStatistics(options)
                | f"Name[{split}]" >> beam.Map(_name_datasets, split)
            )
            out[split] = stats
            written.append(
                stats
                | f"Write[{split}]"
                >> artifact_io.WriteProto(artifact_io.split_file(uri, split, artifact_io.STATS_FILE))
            )
        splits = list(out)
        properties = (
            written
            | "Written" >> beam.Flatten()
            | "Count" >> beam.combiners.Count.Globally()
            | "Properties" >> beam.Map(lambda _: {"split_names": splits})
        )
        self.ctx.publish("statistics", properties)
        return {"statistics": out}


def _name_datasets(stats, split: str):
    """The unsliced dataset is named after its split, as TFDV's visualizations label it."""
    for dataset in stats.datasets:
        if dataset.name in ("", "All Examples"):
            dataset.name = split
    return stats
