"""Conditions: a comparison on a property of an artifact of this run, and `Cond`, the block it guards."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from beam_pipeline.errors import PipelineDefinitionError

if TYPE_CHECKING:
    from beam_pipeline.dsl import Channel


_OPS: dict[str, Any] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">": lambda a, b: a is not None and a > b,
    ">=": lambda a, b: a is not None and a >= b,
    "<": lambda a, b: a is not None and a < b,
    "<=": lambda a, b: a is not None and a <= b,
}


@dataclasses.dataclass(frozen=True)
class Predicate:
    """`channel`'s artifact property `name` compared with `value`: the condition of a `Cond`."""

    channel: Channel
    name: str
    op: str
    value: Any

    def holds(self, properties: Mapping[str, Any]) -> bool:
        return bool(_OPS[self.op](properties.get(self.name), self.value))

    def __str__(self) -> str:
        return f"{self.channel.producer.id}.{self.channel.name}.{self.name} {self.op} {self.value!r}"


class PropertyRef:
    def __init__(self, channel: Channel, name: str):
        self._channel, self._name = channel, name

    def _compare(self, op: str, value: Any) -> Predicate:
        return Predicate(self._channel, self._name, op, value)

    def __eq__(self, value: Any) -> Predicate:  # type: ignore[override]
        return self._compare("==", value)

    def __ne__(self, value: Any) -> Predicate:  # type: ignore[override]
        return self._compare("!=", value)

    def __gt__(self, value: Any) -> Predicate:
        return self._compare(">", value)

    def __ge__(self, value: Any) -> Predicate:
        return self._compare(">=", value)

    def __lt__(self, value: Any) -> Predicate:
        return self._compare("<", value)

    def __le__(self, value: Any) -> Predicate:
        return self._compare("<=", value)

    __hash__ = None  # type: ignore[assignment]


_CONDITIONS: list[Predicate] = []


class Cond:
    """Components defined inside run only when `predicate` holds for the artifact of this run:

        with Cond(evaluator.outputs.blessing.property("blessed") == 1):
            pusher = Pusher(...)

    The launcher runs the pipeline's unconditional part first, then judges each condition on the
    published artifact and runs what holds; a component whose condition does not hold, and
    everything downstream of it, is recorded as skipped with the reason.
    """

    def __init__(self, predicate: Predicate):
        if not isinstance(predicate, Predicate):
            raise PipelineDefinitionError(
                f"Cond needs a comparison such as channel.property('blessed') == 1, got {predicate!r}"
            )
        self.predicate = predicate

    def __enter__(self) -> Cond:
        _CONDITIONS.append(self.predicate)
        return self

    def __exit__(self, *exc: Any) -> None:
        _CONDITIONS.pop()


def active_conditions() -> list[Predicate]:
    """The comparisons of the `Cond` blocks being defined now, outermost first."""
    return list(_CONDITIONS)
