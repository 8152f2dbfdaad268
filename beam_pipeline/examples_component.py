"""ExamplesComponent: a user's PTransform over RecordBatches as a component that turns Examples into new Examples.

    # my_transforms.py
    def drop_short_trips(min_miles: float = 0.5):
        keep = lambda batch: pc.greater_equal(pc.list_element(batch["trip_miles"], 0), min_miles)
        return beam.Map(lambda batch: batch.filter(keep(batch)))

    filtered = ExamplesComponent(examples=example_gen.outputs.examples, module_file="my_transforms.py",
                                 transform="drop_short_trips", params={"min_miles": 1.0})

`transform` names a function of `module_file` that returns a `beam.PTransform` from RecordBatches
(list-typed columns, ExampleGen's layout) to RecordBatches; it is called with `params` once per
split and applied to that split's batches, in the graph, fused with whatever reads them. The output
is Parquet per split like ExampleGen's, so every component that takes Examples takes it. Its batches
keep the input's columns and types (consumers plan on them when the graph is built; a batch that
does not fails the run naming the columns): filter, clean, deduplicate or resample rows here, and
engineer features in Transform. The module's content and the params are part of the cache key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import apache_beam as beam
import pyarrow as pa

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import InputDataError, UserModuleError


class ExamplesComponent(Component):
    """Apply `module_file`'s `transform(**params)` to each split of `examples` (see the module docstring)."""

    INPUTS = {"examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"examples": EXAMPLES}

    def __init__(
        self,
        *,
        examples: Channel,
        module_file: str,
        transform: str,
        params: Mapping[str, Any] | None = None,
        component_id: str | None = None,
    ):
        super().__init__(
            inputs={"examples": examples},
            params={"module_file": module_file, "transform": transform, "params": dict(params or {})},
            component_id=component_id,
        )
        self._factory(module_file)  # a missing module or function fails when the pipeline is defined

    def _factory(self, module_file: str) -> Any:
        from transforms import _user_module

        return getattr(
            _user_module.load_module(module_file, [self.params["transform"]], self.id), self.params["transform"]
        )

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        examples = input_static["examples"]
        static = {"splits": examples.get("splits"), "payload_format": artifact_io.PARQUET}
        if examples.get("arrow_schema") is not None:
            static["arrow_schema"] = examples["arrow_schema"]  # kept: see _checked
        return {"examples": static}

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        factory = self._factory(self.ctx.module_file("module_file", self.params["module_file"]))
        uri = self.ctx.output_uri("examples")
        expected = self.ctx.input_static["examples"].get("arrow_schema")
        outputs, counts = {}, []
        for split, batches in inputs["examples"].items():
            transform = factory(**self.params["params"])
            if not isinstance(transform, beam.PTransform):
                raise UserModuleError(
                    f"{self.id}: {self.params['transform']}() in {self.params['module_file']} returned "
                    f"{type(transform).__name__}, expected a beam.PTransform over RecordBatches"
                )
            out = (
                batches
                | f"{split}.Apply" >> transform
                | f"{split}.Check" >> beam.Map(_checked, self.id, split, expected)
            )
            prefix = artifact_io.join(uri, f"Split-{split}", "part")
            written = out | f"{split}.Write" >> artifact_io.WriteBatchesToParquet(prefix)
            rows = (
                out
                | f"{split}.Rows" >> beam.Map(lambda batch: batch.num_rows)
                | f"{split}.Sum" >> beam.CombineGlobally(sum)
                | f"{split}.AfterWrite" >> beam.Map(lambda n, s=split, _w=None: {s: n}, _w=beam.pvalue.AsList(written))
            )
            counts.append(rows)
            outputs[split] = out
        splits = list(inputs["examples"])
        row_counts = (
            counts
            | "AllSplits" >> beam.Flatten()
            | "Gather" >> beam.combiners.ToList()
            | "Merge" >> beam.Map(lambda per_split: {s: n for d in per_split for s, n in d.items()})
        )
        self.ctx.publish(
            "examples",
            row_counts
            | "Properties"
            >> beam.Map(
                lambda c, names=tuple(splits): {
                    "split_names": list(names),
                    "row_counts": {s: c.get(s, 0) for s in names},
                    "payload_format": artifact_io.PARQUET,
                }
            ),
        )
        return {"examples": outputs}


def _checked(batch: Any, component_id: str, split: str, expected: pa.Schema | None) -> pa.RecordBatch:
    """A RecordBatch with the input's columns and types, which consumers planned on (e.g. Transform's
    input schema, decided when the graph is built)."""
    if not isinstance(batch, pa.RecordBatch):
        raise UserModuleError(
            f"{component_id}: split {split}: the transform emitted {type(batch).__name__}, expected pyarrow.RecordBatch"
        )
    if expected is not None and not batch.schema.equals(expected):
        got = {f.name: str(f.type) for f in batch.schema}
        want = {f.name: str(f.type) for f in expected}
        changed = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
        raise InputDataError(
            f"{component_id}: split {split}: the transform changed columns {changed} (got "
            f"{[got.get(n) for n in changed]}, expected {[want.get(n) for n in changed]}); an ExamplesComponent "
            "keeps its input's columns and types: feature engineering is Transform's"
        )
    return batch
