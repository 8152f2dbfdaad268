"""tf.Transform's analyzer cache over spans: each span of the analyzed splits is a dataset whose analysis is kept.

A rolling window's rerun then analyzes only its new span: the accumulators of the spans it shares
with the previous window come from that run's cache (TFT keys them by the analyzer's graph, so a
changed preprocessing_fn recomputes them), and are combined with the new span's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam

CACHE_DIR = "analyzer_cache"


@dataclasses.dataclass
class AnalyzerCache:
    """The analysis inputs by dataset (None where the cache holds all it needs), the cache read, where to write."""

    datasets: dict[Any, beam.PCollection | None]
    input_cache: dict[Any, Any]
    output_dir: str

    @property
    def reused(self) -> list[str]:
        """The dataset keys whose data is not read: their analysis comes from the cache."""
        return sorted(k.key for k, v in self.datasets.items() if v is None)


def dataset_keys(splits: Sequence[str], span_fingerprints: Mapping[int, str], examples_digest: str) -> dict[Any, tuple]:
    """A TFT DatasetKey per (split, span), naming its content: the span's files and how they were split."""
    from tensorflow_transform.beam import analyzer_cache

    keys = {}
    for split in splits:
        for span, fingerprint in sorted(span_fingerprints.items()):
            digest = hashlib.blake2b(f"{fingerprint}/{examples_digest}".encode(), digest_size=8).hexdigest()
            keys[analyzer_cache.DatasetKey(f"{split}-span{span}-{digest}")] = (split, span)
    return keys


def plan_cache(
    pipeline: beam.Pipeline,
    preprocessing_fn: Callable,
    tensor_adapter_config: Any,
    keys: Mapping[Any, tuple],
    read: Callable[[str, int], beam.PCollection],
    previous_dir: str | None,
    output_dir: str,
) -> AnalyzerCache:
    """Read the previous cache (if any) and read only the spans whose analysis it lacks (`read(split, span)`)."""
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.beam import analysis_graph_builder
    from tfx_bsl.tfxio.tensor_adapter import TensorAdapter

    input_cache = {}
    if previous_dir:
        input_cache = pipeline | "ReadAnalyzerCache" >> tft_beam.analyzer_cache.ReadAnalysisCacheFromFS(
            previous_dir, list(keys)
        )
    specs = TensorAdapter(tensor_adapter_config).OriginalTypeSpecs()
    needed = analysis_graph_builder.get_analysis_dataset_keys(
        preprocessing_fn, specs, list(keys), input_cache, force_tf_compat_v1=False
    )
    datasets = {key: read(*where) if key in needed else None for key, where in keys.items()}
    return AnalyzerCache(datasets, dict(input_cache), output_dir)


def analyze_with_cache(
    cache: AnalyzerCache, preprocessing_fn: Callable, tensor_adapter_config: Any, pipeline: beam.Pipeline
) -> tuple[Any, list[beam.PCollection]]:
    """(transform_fn, the cache writes): the new cache holds every dataset of this window, read or reused."""
    import tensorflow_transform.beam as tft_beam

    transform_fn, output_cache = (
        cache.datasets,
        cache.input_cache,
        tensor_adapter_config,
    ) | "AnalyzeWithCache" >> tft_beam.AnalyzeDatasetWithCache(preprocessing_fn)
    # Carry the entries read over (merged with the new ones), so the next window finds them here.
    kept = {}
    for key in cache.datasets:
        old, new = cache.input_cache.get(key), (output_cache or {}).get(key)
        if old is None and new is None:
            continue
        entries = {**(dict(old.cache_dict) if old else {}), **(dict(new.cache_dict) if new else {})}
        metadata = new.metadata if new is not None and new.metadata is not None else (old.metadata if old else None)
        kept[key] = tft_beam.analyzer_cache.DatasetCache(entries, metadata)
    writes = kept | "WriteAnalyzerCache" >> tft_beam.analyzer_cache.WriteAnalysisCacheToFS(
        pipeline, cache.output_dir, list(cache.datasets)
    )
    return transform_fn, list(writes)
