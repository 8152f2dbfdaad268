"""The pipeline DSL: components wired by channels, gathered into a Pipeline.

A component is a composite `beam.PTransform`. Its typed spec (INPUTS, OUTPUTS, constructor arguments)
is what the user writes; its `expand` is applied by the compiler to a dict of in-graph input values
and returns a dict of in-graph output values. What an "in-graph value" is depends on the artifact type
(see `beam_pipeline.artifact_io`): Examples are `{split: PCollection[pyarrow.RecordBatch]}`, a
Schema is a one-element `PCollection[schema_pb2.Schema]`, file artifacts a one-element PCollection of
their URI emitted once the files are written, and so on.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.artifacts import ArtifactType
from beam_pipeline.conditions import Cond as Cond  # re-exported: part of the DSL
from beam_pipeline.conditions import Predicate, PropertyRef, active_conditions
from beam_pipeline.errors import PipelineDefinitionError

_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# Under the pipeline root: one directory per run for files its workers exchange; the run removes it.
SCRATCH_DIR = "_scratch"


def scratch_root(pipeline_root: str, run_id: str) -> str:
    """The run's scratch directory: transient, shared by its workers, deleted when the run ends."""
    return FileSystems.join(pipeline_root, SCRATCH_DIR, run_id)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    type: ArtifactType
    optional: bool = False


class Channel:
    """A reference to one output of a component; pass it as another component's input."""

    def __init__(self, producer: Component, name: str, type_: ArtifactType):
        self.producer = producer
        self.name = name
        self.type = type_

    def __repr__(self) -> str:
        return f"Channel({self.producer.id}.outputs.{self.name}: {self.type.name})"

    def property(self, name: str) -> PropertyRef:
        """A property of this output's artifact, to compare in a `Cond`: `blessing.property("blessed") == 1`."""
        return PropertyRef(self, name)


class _Outputs:
    def __init__(self, channels: dict[str, Channel]):
        self._channels = channels

    def __getattr__(self, name: str) -> Channel:
        try:
            return self.__dict__["_channels"][name]
        except KeyError:
            raise AttributeError(f"no output {name!r}; outputs are {sorted(self._channels)}") from None

    def __getitem__(self, name: str) -> Channel:
        return self._channels[name]

    def items(self):
        return self._channels.items()


@dataclasses.dataclass
class ComponentContext:
    """What the compiler tells a component while it is being applied to the graph."""

    pipeline_name: str
    pipeline_root: str
    run_id: str
    execution_id: int
    output_uris: dict[str, str]
    # Compile-time facts about each input (e.g. the Arrow schema and split names of Examples).
    input_static: dict[str, dict[str, Any]]
    # Compile-time facts this component derived for its outputs (from `static_outputs`).
    output_static: dict[str, dict[str, Any]]
    # Previous artifacts the compiler resolved from ML Metadata (baseline model, warm-start model, ...).
    resolved: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Final URI of each input artifact, known when the graph is built (files may not exist yet).
    input_uris: dict[str, str] = dataclasses.field(default_factory=dict)
    # One-element PCollection[Artifact] per input, emitted once the producer committed that artifact.
    committed_inputs: dict[str, beam.PCollection] = dataclasses.field(default_factory=dict)
    # Set by the compiler: builds the commit step of one output from its properties PCollection.
    commit_factory: Any = None
    committed_outputs: dict[str, beam.PCollection] = dataclasses.field(default_factory=dict)
    # Module-file parameter -> its copy staged under the pipeline root at launch (what workers load).
    staged_modules: dict[str, str] = dataclasses.field(default_factory=dict)
    # Examples inputs read from their committed files: split -> a new, independent read of it.
    readers: dict[str, Any] = dataclasses.field(default_factory=dict)

    def read_again(self, name: str, split: str, value: beam.PCollection) -> beam.PCollection:
        """A second read of one split of Examples input `name`, for a consumer that needs the data twice.

        Reading the files again keeps a runner that buffers between stages from holding the whole
        split for the second consumer; where the data lives only in the graph, `value` itself.
        """
        reader = self.readers.get(name)
        return reader(split) if reader is not None else value

    def output_uri(self, name: str) -> str:
        return self.output_uris[name]

    def scratch_uri(self, name: str) -> str:
        """`name` in this run's scratch directory (see `scratch_root`), which every worker can reach."""
        return FileSystems.join(scratch_root(self.pipeline_root, self.run_id), name)

    def module_file(self, param: str, default: str) -> str:
        """The staged copy of a user module parameter, else `default` (the path as configured)."""
        return self.staged_modules.get(param, default)

    def publish(self, name: str, properties: beam.PCollection) -> beam.PCollection:
        """Declare that output `name` is complete once `properties` (PCollection of dicts) is done.

        The dicts are merged and recorded as the artifact's properties. Returns the commit signal,
        a one-element PCollection[Artifact], for steps that must run only after the commit.
        """
        if name not in self.output_uris:
            raise PipelineDefinitionError(f"publish() of unknown output {name!r}")
        if name in self.committed_outputs:
            raise PipelineDefinitionError(f"output {name!r} published twice")
        self.committed_outputs[name] = self.commit_factory(name, properties)
        return self.committed_outputs[name]


class Component(beam.PTransform):
    """Base class. Subclasses declare INPUTS/OUTPUTS, call `super().__init__` and implement `expand`."""

    INPUTS: ClassVar[Mapping[str, InputSpec]] = {}
    OUTPUTS: ClassVar[Mapping[str, ArtifactType]] = {}
    # Bump when a change to the implementation changes what it outputs: part of the cache key.
    VERSION: ClassVar[str] = "1"
    # By default a component starts only after its producers committed, so a failure here leaves them
    # published and a rerun reuses them. That wait materializes the inputs at a barrier; a cheap,
    # reliable consumer of bulk data sets this to run fused with its producers instead (a failure then
    # also fails them, and a rerun redoes them).
    FUSE_WITH_PRODUCERS: ClassVar[bool] = False
    # The external fingerprint is taken when the run is planned, before anything reads the inputs.
    # A component that changes the world it fingerprints (the Pusher adds a version to the serving
    # directory) sets this so the key it records describes the world as it left it: a rerun finds that.
    FINGERPRINT_AFTER_RUN: ClassVar[bool] = False
    # A node the launcher settles when it plans the run and that never runs in the graph
    # (`beam_pipeline.nodes`: Importer, Resolver).
    PLANNED: ClassVar[bool] = False

    def __init__(
        self,
        *,
        inputs: Mapping[str, Channel | None],
        params: Mapping[str, Any] | None = None,
        component_id: str | None = None,
    ):
        super().__init__()
        self.id = component_id or type(self).__name__
        self.inputs: dict[str, Channel] = {}
        for name, channel in inputs.items():
            spec = self.INPUTS.get(name)
            if spec is None:
                raise PipelineDefinitionError(f"{self.id}: unknown input {name!r}; inputs are {sorted(self.INPUTS)}")
            if channel is None:
                if not spec.optional:
                    raise PipelineDefinitionError(f"{self.id}: input {name!r} ({spec.type.name}) is required")
                continue
            if not isinstance(channel, Channel):
                raise PipelineDefinitionError(
                    f"{self.id}: input {name!r} must be a channel such as other.outputs.x, got {type(channel).__name__}"
                )
            if channel.type != spec.type:
                raise PipelineDefinitionError(
                    f"{self.id}: input {name!r} expects {spec.type.name}, "
                    f"got {channel.type.name} from {channel.producer.id}"
                )
            self.inputs[name] = channel
        for name, spec in self.INPUTS.items():
            if name not in self.inputs and not spec.optional:
                raise PipelineDefinitionError(f"{self.id}: input {name!r} ({spec.type.name}) is required")
        self.params: dict[str, Any] = dict(params or {})
        self.conditions: list[Predicate] = active_conditions()  # the Conds this component was defined in
        self.enable_cache: bool | None = None
        self.outputs = _Outputs({n: Channel(self, n, t) for n, t in self.OUTPUTS.items()})
        self._ctx: ComponentContext | None = None

    # -- DSL -------------------------------------------------------------------------------------
    def with_id(self, component_id: str) -> Component:
        if not _ID_RE.match(component_id):
            raise PipelineDefinitionError(f"component id {component_id!r} must match {_ID_RE.pattern}")
        self.id = component_id
        return self

    def with_cache(self, enabled: bool) -> Component:
        self.enable_cache = enabled
        return self

    @property
    def upstream(self) -> list[Component]:
        return [c.producer for c in self.inputs.values()]

    # -- what the compiler asks --------------------------------------------------------------------
    def splits_read(self, name: str, splits: Sequence[str]) -> list[str]:
        """The splits of Examples input `name` this component reads in the graph (default: all)."""
        return list(splits)

    def module_files(self) -> list[str]:
        """User module files this component loads; their content is part of the cache key."""
        return [v for k, v in self.params.items() if k.endswith("module_file") and v]

    def exec_properties(self) -> dict[str, Any]:
        """The runtime configuration recorded in ML Metadata and hashed into the cache key."""
        return {k: _jsonable(v, f"{self.id}: parameter {k!r}") for k, v in sorted(self.params.items())}

    def cache_config(self) -> dict[str, Any]:
        """The configuration hashed into the cache key: all of it, unless another key input already
        says what a parameter decides (ExampleGen's range of spans: the files it picks)."""
        return self.exec_properties()

    def external_fingerprint(self, inputs: Mapping[str, Sequence[Any]] | None = None) -> str:
        """Fingerprint of what decides the outputs besides config and channel inputs (input files,
        resolved artifacts); part of the cache key. `inputs` are the input Artifacts, when known."""
        return ""

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Compile-time facts about outputs, decided on the driver before the graph is built. Default: none."""
        return {name: {} for name in self.OUTPUTS}

    def resolve(self, store: Any, pipeline_name: str) -> dict[str, Any]:
        """Previous artifacts this component needs from ML Metadata, looked up before the graph is built.

        Artifact values decide the outputs and are part of the cache key (a baseline model, a
        warm-start model); other values are hints that change how, not what, it outputs (the
        Pusher's last push, which only saves a copy) and are not.
        """
        return {}

    def always_run(self) -> bool:
        """True for components whose outcome depends on the world outside their inputs (e.g. Pusher)."""
        return False

    @property
    def ctx(self) -> ComponentContext:
        if self._ctx is None:
            raise PipelineDefinitionError(f"{self.id}: context is only available while the compiler applies it")
        return self._ctx

    def bind(self, ctx: ComponentContext | None) -> None:
        self._ctx = ctx

    def default_label(self) -> str:
        return self.id


def _jsonable(value: Any, where: str) -> Any:
    """A configuration value as JSON, exactly: what is recorded is what is hashed into the cache key.

    No `repr` fallback: an object's repr may hold its address (the key would never hit) or elide
    its content (a large numpy array would collide with another).
    """
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "SerializeToString"):
        from google.protobuf import json_format

        return json_format.MessageToDict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value), where)
    if type(value).__module__ == "numpy":
        import hashlib

        import numpy as np

        if isinstance(value, np.generic):
            return _jsonable(value.item(), where)
        array = np.ascontiguousarray(value)
        if array.dtype == object:
            return _jsonable(array.tolist(), where)
        digest = hashlib.sha256(array.tobytes()).hexdigest()
        return {"ndarray": {"dtype": str(array.dtype), "shape": list(array.shape), "sha256": digest}}
    raise PipelineDefinitionError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be recorded in ML Metadata "
        "or hashed for caching: pass strings, numbers, booleans, lists, dicts, protos, dataclasses or numpy arrays"
    )


class Pipeline:
    """A named set of components with a root directory for artifacts and ML Metadata."""

    def __init__(
        self,
        pipeline_name: str,
        pipeline_root: str,
        components: Sequence[Component],
        *,
        metadata_connection: Any = None,
        enable_cache: bool = True,
        beam_pipeline_args: Sequence[str] = (),
    ):
        if not _ID_RE.match(pipeline_name):
            raise PipelineDefinitionError(f"pipeline name {pipeline_name!r} must match {_ID_RE.pattern}")
        self.name = pipeline_name
        self.root = pipeline_root if "://" in pipeline_root else os.path.abspath(pipeline_root)
        self.components = list(components)
        self.metadata_connection = metadata_connection
        self.enable_cache = enable_cache
        self.beam_pipeline_args = list(beam_pipeline_args)
        self.ordered = topological_order(self.components)

    def component(self, component_id: str) -> Component:
        for c in self.components:
            if c.id == component_id:
                return c
        raise KeyError(component_id)


def topological_order(components: Iterable[Component]) -> list[Component]:
    """Order components so each comes after its inputs' producers; reject duplicates, cycles, strays."""
    components = list(components)
    seen: dict[str, Component] = {}
    for c in components:
        if not isinstance(c, Component):
            raise PipelineDefinitionError(f"pipeline components must be Component instances, got {c!r}")
        if c.id in seen:
            raise PipelineDefinitionError(
                f"duplicate component id {c.id!r}: give one of them another id with .with_id('...')"
            )
        seen[c.id] = c
    members = {id(c) for c in components}
    for c in components:
        for name, ch in c.inputs.items():
            if id(ch.producer) not in members:
                raise PipelineDefinitionError(
                    f"{c.id}: input {name!r} comes from {ch.producer.id}, which is not in the pipeline's components"
                )
    order: list[Component] = []
    state: dict[int, int] = {}  # 1 = visiting, 2 = done

    def visit(c: Component, path: list[str]) -> None:
        s = state.get(id(c))
        if s == 2:
            return
        if s == 1:
            cycle = [*path[path.index(c.id) :], c.id]
            raise PipelineDefinitionError(f"cycle between components: {' -> '.join(cycle)}")
        state[id(c)] = 1
        for up in c.upstream:
            visit(up, [*path, c.id])
        state[id(c)] = 2
        order.append(c)

    for c in components:
        visit(c, [])
    return order
