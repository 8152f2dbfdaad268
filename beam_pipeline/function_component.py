"""`@component`: a typed Python function as a pipeline component that runs as one Beam stage.

    @component
    def ScaleCheck(model: Input[MODEL], report: Output[MODEL_EVALUATION], max_mb: int = 50) -> None:
        size = sum(f.size_in_bytes for f in FileSystems.match([model.uri + "/**"])[0].metadata_list)
        report.properties["size_mb"] = size / 2**20
        artifact_io.write_text(report.uri + "/size.txt", str(size))

    check = ScaleCheck(model=trainer.outputs.model, max_mb=80)

Inputs arrive as committed `Artifact`s (uri, properties), outputs as Artifacts whose `uri` is the
directory to write and whose `properties` are recorded in ML Metadata; other arguments are
parameters (JSON-able, recorded and part of the cache key, defaults from the signature). The stage
starts once every input is committed and runs wherever the runner puts it; the function travels by
value, so an SDK worker needs only the libraries it imports. It is cached like the built-ins: by its
source file's content, its parameters and its inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any

import apache_beam as beam

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import SCHEMA, Artifact, ArtifactType
from beam_pipeline.dsl import Component, InputSpec
from beam_pipeline.errors import BeamPipelineError, PipelineDefinitionError, UserModuleError


@dataclasses.dataclass(frozen=True)
class _Annotation:
    direction: str
    type: ArtifactType
    optional: bool = False


class Input:
    """`Input[SCHEMA]`: an input artifact of that type (`Input[SCHEMA, "optional"]` may be left unwired)."""

    def __class_getitem__(cls, spec: Any) -> _Annotation:
        atype, *rest = spec if isinstance(spec, tuple) else (spec,)
        return _Annotation("input", _artifact_type(atype), optional=rest == ["optional"])


class Output:
    """`Output[MODEL]`: an output artifact of that type, written by the function."""

    def __class_getitem__(cls, atype: Any) -> _Annotation:
        return _Annotation("output", _artifact_type(atype))


def _artifact_type(atype: Any) -> ArtifactType:
    if not isinstance(atype, ArtifactType):
        raise PipelineDefinitionError(f"Input[...] / Output[...] take an ArtifactType such as SCHEMA, got {atype!r}")
    return atype


# Outputs whose in-graph value consumers need: read back from the committed files. Examples, statistics
# and anomalies are per split, which a function cannot declare before it runs: bulk work over
# RecordBatches is `ExamplesComponent`'s.
_READ_BACK = {SCHEMA.name: artifact_io.read_schema}


def component(fn: Callable[..., Any]) -> type[Component]:
    """Turn `fn` into a Component class named after it (see the module docstring)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    inputs: dict[str, InputSpec] = {}
    outputs: dict[str, ArtifactType] = {}
    params: dict[str, Any] = {}
    for name, p in inspect.signature(fn).parameters.items():
        hint = hints.get(name)
        if isinstance(hint, _Annotation) and hint.direction == "input":
            inputs[name] = InputSpec(hint.type, optional=hint.optional)
        elif isinstance(hint, _Annotation):
            if artifact_io.has_data_value(hint.type) and hint.type.name not in _READ_BACK:
                raise PipelineDefinitionError(
                    f"@component {fn.__name__}: output {name!r} of type {hint.type.name} holds per-split data; "
                    "write Examples with ExamplesComponent (a PTransform over RecordBatches)"
                )
            outputs[name] = hint.type
        else:
            params[name] = p.default
    if not outputs:
        raise PipelineDefinitionError(f"@component {fn.__name__}: declare at least one Output[...] argument")
    module = sys.modules.get(fn.__module__)
    if (
        module is not None
        and fn.__module__ != "__main__"
        and not fn.__module__.startswith(("beam_pipeline.", "transforms."))
    ):
        from apache_beam.internal.cloudpickle import cloudpickle as beam_cloudpickle

        beam_cloudpickle.register_pickle_by_value(module)  # workers need not import the pipeline file
    source = inspect.getsourcefile(fn)

    def __init__(self, *, component_id: str | None = None, **kwargs: Any):
        unknown = set(kwargs) - set(inputs) - set(params)
        if unknown:
            raise PipelineDefinitionError(
                f"{fn.__name__}: unknown arguments {sorted(unknown)}; inputs are {sorted(inputs)}, "
                f"parameters {sorted(params)}"
            )
        values = {}
        for name, default in params.items():
            value = kwargs.get(name, default)
            if value is inspect.Parameter.empty:
                raise PipelineDefinitionError(f"{fn.__name__}: parameter {name!r} has no default and was not given")
            values[name] = value
        Component.__init__(
            self,
            inputs={name: kwargs.get(name) for name in inputs},
            params=values,
            component_id=component_id or fn.__name__,
        )
        self.exec_properties()  # a parameter that cannot be recorded fails here, naming it

    namespace = {
        "__init__": __init__,
        "__doc__": fn.__doc__,
        "__module__": fn.__module__,
        "INPUTS": inputs,
        "OUTPUTS": outputs,
        "function": staticmethod(fn),
        "module_files": lambda self: [source] if source else [],
        "expand": _expand,
    }
    return type(fn.__name__, (Component,), namespace)


def _expand(self: Component, inputs: Any) -> dict[str, Any]:
    ctx = self.ctx
    if isinstance(inputs, beam.pvalue.PBegin):  # no inputs: the compiler hands over the pipeline itself
        begin, inputs = inputs, {}
    else:
        begin = next(iter(ctx.committed_inputs.values())).pipeline
    side = {name: beam.pvalue.AsSingleton(ctx.committed_inputs[name]) for name in inputs}
    out_uris = {name: ctx.output_uri(name) for name in self.OUTPUTS}
    results = (
        begin
        | "Start" >> beam.Create([None])
        | "Call" >> beam.Map(_call, self.function, self.id, dict(self.params), dict(self.OUTPUTS), out_uris, **side)
    )
    values = {}
    for name, atype in self.OUTPUTS.items():
        signal = ctx.publish(name, results | f"{name}.Properties" >> beam.Map(lambda r, n=name: r[n]))
        if atype.name in _READ_BACK:
            values[name] = signal | f"{name}.Read" >> beam.Map(_READ_BACK[atype.name])
    return values


def _call(
    _: None,
    fn: Callable[..., Any],
    component_id: str,
    params: dict[str, Any],
    outputs: dict[str, ArtifactType],
    out_uris: dict[str, str],
    **artifacts: Artifact,
) -> dict[str, dict[str, Any]]:
    out = {name: Artifact(atype, out_uris[name], {}) for name, atype in outputs.items()}
    try:
        fn(**artifacts, **out, **params)
    except BeamPipelineError:
        raise
    except Exception as e:
        raise UserModuleError(f"{component_id}: {fn.__name__} raised {type(e).__name__}: {e}") from e
    return {name: dict(a.properties) for name, a in out.items()}
