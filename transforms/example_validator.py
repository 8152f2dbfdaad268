"""ExampleValidator: each split's statistics against the schema, drift between datasets, skew against serving data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import apache_beam as beam

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import ANOMALIES, SCHEMA, STATISTICS
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import AnomaliesFoundError, PipelineDefinitionError

PREVIOUS_RUN = "previous_run"


class ValidateStatistics(beam.PTransform):
    """TFDV anomalies of each split's statistics against a schema, with drift, in any Beam pipeline.

    Example::

        anomalies = stats | ValidateStatistics(schema, drift_comparators={"payment_type": 0.1})
        # {split: PCollection[Anomalies]}; each split other than "train" is also compared to train

    Input: `{split: PCollection[DatasetFeatureStatisticsList]}`; `schema` a one-element
    PCollection[Schema]. `drift_comparators` maps feature → threshold (L-infinity distance for
    categorical features, Jensen-Shannon divergence for numeric ones), compared against
    `drift_baseline` (a split of the input) or, when given, `previous` (`{split: PCollection}` of
    earlier statistics, e.g. the previous span's). `serving` (a one-element PCollection of serving
    data's statistics) with `skew_comparators` (feature → L-infinity threshold) checks split
    `skew_split` for training/serving skew.
    """

    def __init__(
        self,
        schema: beam.PCollection,
        *,
        drift_comparators: Mapping[str, float] | None = None,
        drift_baseline: str = "train",
        previous: Mapping[str, beam.PCollection] | None = None,
        serving: beam.PCollection | None = None,
        skew_comparators: Mapping[str, float] | None = None,
        skew_split: str = "train",
    ):
        super().__init__()
        if bool(serving is not None) != bool(skew_comparators):
            raise PipelineDefinitionError("skew needs both serving statistics and skew_comparators")
        self._schema, self._comparators = schema, dict(drift_comparators or {})
        self._baseline, self._previous = drift_baseline, previous
        self._serving, self._skew, self._skew_split = serving, dict(skew_comparators or {}), skew_split

    def expand(self, stats: Mapping[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        if self._serving is not None and self._skew_split not in stats:
            raise PipelineDefinitionError(f"skew_split {self._skew_split!r} is not a split ({sorted(stats)})")
        schema = beam.pvalue.AsSingleton(
            self._schema | "Comparators" >> beam.Map(_with_comparators, self._comparators, self._skew)
        )
        drift = bool(self._comparators)
        if drift and self._previous is None and self._baseline not in stats:
            raise PipelineDefinitionError(
                f"drift_baseline {self._baseline!r} is not a split ({sorted(stats)}) "
                "and no previous statistics were given"
            )
        out = {}
        for split, split_stats in stats.items():
            baseline = None
            if drift and self._previous is not None:
                baseline = self._previous.get(split)
            elif drift and self._baseline != split:
                baseline = stats[self._baseline]
            extra = {"previous": beam.pvalue.AsSingleton(baseline)} if baseline is not None else {}
            if self._serving is not None and split == self._skew_split:
                extra["serving"] = beam.pvalue.AsSingleton(self._serving)
            out[split] = split_stats | f"Validate[{split}]" >> beam.Map(_validate, schema=schema, **extra)
        return out


class ExampleValidator(Component):
    """Anomalies per split: missing features, valency, unexpected strings, out of domain, drift and skew.

    `drift_comparators` maps feature → threshold (L-infinity distance for categorical features,
    Jensen-Shannon divergence for numeric ones). `drift_baseline` is a split name (each other split
    is compared to it) or "previous_run" (the latest statistics of this pipeline in ML Metadata,
    the "previous span"). `serving_statistics` (a StatisticsGen over serving data, e.g. logged
    requests read by their own ExampleGen) with `skew_comparators` (feature → L-infinity threshold)
    flags training/serving skew of split `skew_split`; the serving artifact's split
    `serving_split` (default: its only one) is the serving side. With `halt_on_anomalies` the
    anomalies artifact is still committed, then the run fails with a readable summary.
    """

    INPUTS = {
        "statistics": InputSpec(STATISTICS),
        "schema": InputSpec(SCHEMA),
        "serving_statistics": InputSpec(STATISTICS, optional=True),
    }
    OUTPUTS = {"anomalies": ANOMALIES}

    def __init__(
        self,
        *,
        statistics: Channel,
        schema: Channel,
        drift_comparators: Mapping[str, float] | None = None,
        drift_baseline: str = "train",
        serving_statistics: Channel | None = None,
        skew_comparators: Mapping[str, float] | None = None,
        skew_split: str = "train",
        serving_split: str | None = None,
        halt_on_anomalies: bool = False,
        component_id: str | None = None,
    ):
        """`skew_comparators` thresholds are L-infinity for categorical features, Jensen-Shannon for numeric ones."""
        if (serving_statistics is None) != (not skew_comparators):
            raise PipelineDefinitionError(
                "ExampleValidator: skew needs both serving_statistics and skew_comparators ({feature: threshold})"
            )
        super().__init__(
            inputs={"statistics": statistics, "schema": schema, "serving_statistics": serving_statistics},
            params={
                "drift_comparators": dict(drift_comparators or {}),
                "drift_baseline": drift_baseline,
                "skew_comparators": dict(skew_comparators or {}),
                "skew_split": skew_split,
                "serving_split": serving_split,
                "halt_on_anomalies": halt_on_anomalies,
            },
            component_id=component_id,
        )

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        if self.params["drift_baseline"] != PREVIOUS_RUN or not self.params["drift_comparators"]:
            return {}
        previous = store.latest_artifacts(STATISTICS.name, pipeline_name)
        return {"previous_statistics": previous[0]} if previous else {}

    def _serving_side(self, serving: Mapping[str, beam.PCollection] | None) -> beam.PCollection | None:
        """The serving statistics' split to compare with: `serving_split`, or the artifact's only split."""
        if serving is None:
            return None
        name = self.params["serving_split"]
        if name is None and len(serving) != 1:
            raise PipelineDefinitionError(
                f"{self.id}: serving_statistics has splits {sorted(serving)}; say which is serving data (serving_split)"
            )
        name = name or next(iter(serving))
        if name not in serving:
            raise PipelineDefinitionError(f"{self.id}: serving_split {name!r} is not a split ({sorted(serving)})")
        return serving[name]

    def expand(self, inputs):
        from tensorflow_metadata.proto.v0 import statistics_pb2

        uri = self.ctx.output_uri("anomalies")
        stats: dict[str, beam.PCollection] = inputs["statistics"]
        baseline_name = self.params["drift_baseline"]
        if self.params["drift_comparators"] and baseline_name != PREVIOUS_RUN and baseline_name not in stats:
            raise PipelineDefinitionError(
                f"{self.id}: drift_baseline {baseline_name!r} is not a split ({sorted(stats)}) nor {PREVIOUS_RUN!r}"
            )
        previous = None
        if baseline_name == PREVIOUS_RUN:  # the latest statistics in ML Metadata, where that run had the split
            artifact = self.ctx.resolved.get("previous_statistics")
            previous = {
                split: stats[split].pipeline
                | f"Previous[{split}]"
                >> beam.Create(
                    [
                        artifact_io.read_proto(
                            artifact_io.split_file(artifact.uri, split, artifact_io.STATS_FILE),
                            statistics_pb2.DatasetFeatureStatisticsList,
                        )
                    ]
                )
                for split in (artifact.split_names if artifact is not None else [])
                if split in stats
            }
        out = stats | "Validate" >> ValidateStatistics(
            inputs["schema"],
            drift_comparators=self.params["drift_comparators"],
            drift_baseline=baseline_name,
            previous=previous,
            serving=self._serving_side(inputs.get("serving_statistics")),
            skew_comparators=self.params["skew_comparators"],
            skew_split=self.params["skew_split"],
        )
        summaries = []
        for split, anomalies in out.items():
            written = anomalies | f"Write[{split}]" >> artifact_io.WriteProto(
                artifact_io.split_file(uri, split, artifact_io.ANOMALIES_FILE)
            )
            summaries.append(
                (anomalies, written)
                | f"Join[{split}]" >> beam.Flatten()
                | f"Keep[{split}]" >> beam.Filter(lambda x: not isinstance(x, str))
                | f"Summary[{split}]" >> beam.Map(lambda a, s=split: (s, summarize(a)))
            )
        splits = list(out)
        properties = (
            summaries
            | "AllSummaries" >> beam.Flatten()
            | "Collect" >> beam.combiners.ToList()
            | "Properties"
            >> beam.Map(
                lambda rows: {
                    "split_names": splits,
                    "anomaly_count": sum(len(lines) for _, lines in rows),
                    "anomalies": {s: lines for s, lines in rows},
                }
            )
        )
        committed = self.ctx.publish("anomalies", properties)
        if self.params["halt_on_anomalies"]:
            _ = committed | "HaltOnAnomalies" >> beam.Map(_halt, self.id)
        return {"anomalies": out}


def _with_comparators(schema, drift: Mapping[str, float], skew: Mapping[str, float]):
    from tensorflow_metadata.proto.v0 import schema_pb2

    if not drift and not skew:
        return schema
    schema = schema_pb2.Schema.FromString(schema.SerializeToString())
    by_name = {f.name: f for f in schema.feature}
    for kind, comparators in (("drift", drift), ("skew", skew)):
        for name, threshold in comparators.items():
            feature = by_name.get(name)
            if feature is None:
                raise PipelineDefinitionError(
                    f"{kind} comparator for {name!r}: no such feature in the schema ({sorted(by_name)})"
                )
            comparator = feature.drift_comparator if kind == "drift" else feature.skew_comparator
            categorical = (
                feature.type == schema_pb2.BYTES or feature.HasField("domain") or feature.HasField("string_domain")
            )
            if categorical:
                comparator.infinity_norm.threshold = threshold
            else:
                comparator.jensen_shannon_divergence.threshold = threshold
    return schema


def _validate(stats, schema, previous=None, serving=None):
    import tensorflow_data_validation as tfdv

    return tfdv.validate_statistics(stats, schema, previous_statistics=previous, serving_statistics=serving)


def summarize(anomalies) -> list[str]:
    """One readable line per anomalous feature: `feature: short description (detail)`."""
    lines = []
    for name, info in sorted(anomalies.anomaly_info.items()):
        detail = "; ".join(r.description for r in info.reason) or info.description
        lines.append(f"{name}: {info.short_description} ({detail})")
    if anomalies.HasField("dataset_anomaly_info"):
        info = anomalies.dataset_anomaly_info
        lines.append(f"(dataset): {info.short_description} ({info.description})")
    return lines


def _halt(artifact, component_id: str):
    report = artifact.properties.get("anomalies", {})
    count = artifact.properties.get("anomaly_count", 0)
    if count:
        lines = [f"  {split}/{line}" for split, split_lines in sorted(report.items()) for line in split_lines]
        raise AnomaliesFoundError(
            f"{component_id} found {count} anomalies (halt_on_anomalies=True); see {artifact.uri}:\n" + "\n".join(lines)
        )
    return artifact
