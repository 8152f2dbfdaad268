"""Spans and versions in ExampleGen's input pattern ({SPAN}, {VERSION}, a date) and which spans a run reads."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Any

from apache_beam.io.filesystem import FileMetadata

from beam_pipeline import remote_fs
from beam_pipeline.artifacts import EXAMPLES, Artifact
from beam_pipeline.errors import InputDataError, PipelineDefinitionError
from beam_pipeline.nodes import ResolverStrategy
from transforms._input_files import match_metadata

SPAN, VERSION = "{SPAN}", "{VERSION}"
DATE_PARTS = ("{YYYY}", "{MM}", "{DD}")
_SPECS = (SPAN, VERSION, *DATE_PARTS)
_GROUPS = {SPAN: "span", VERSION: "version", "{YYYY}": "year", "{MM}": "month", "{DD}": "day"}
_EPOCH = datetime.date(1970, 1, 1)


@dataclasses.dataclass(frozen=True)
class RangeConfig:
    """Which spans a run reads: the latest (default), a static range, or a rolling window of the last N."""

    kind: str = "latest"
    start: int | None = None
    end: int | None = None
    num_spans: int = 1
    until: int | None = None

    @classmethod
    def latest(cls) -> RangeConfig:
        return cls()

    @classmethod
    def static(cls, start: int, end: int) -> RangeConfig:
        """Spans start..end, both included; each must exist."""
        if not 0 <= start <= end:
            raise PipelineDefinitionError(f"RangeConfig.static({start}, {end}): expected 0 <= start <= end")
        return cls("static", start, end)

    @classmethod
    def rolling(cls, num_spans: int, until: int | str | None = None) -> RangeConfig:
        """The newest `num_spans` spans that exist, up to span `until` (a span or a YYYY-MM-DD date) if given.

        `until` is how a scheduled run reads the window of its own day, e.g. Airflow's `{{ ds }}`,
        so a backfill of an old day does not read the days after it. That span itself must exist.
        """
        if num_spans < 1:
            raise PipelineDefinitionError(f"RangeConfig.rolling({num_spans}): expected at least one span")
        return cls("rolling", num_spans=num_spans, until=None if until is None else span_of(until))


def span_of(span_or_date: int | str) -> int:
    """A span number, from itself or from a YYYY-MM-DD date (TFX's span of a date: days since 1970-01-01).

    A timestamp's date counts (`2026-12-01T00:00:00Z`, what Kubeflow's schedule time gives).
    """
    if isinstance(span_or_date, int):
        return span_or_date
    try:
        day = datetime.date.fromisoformat(span_or_date[:10] if span_or_date[10:11] in ("T", " ") else span_or_date)
    except ValueError:
        if span_or_date.isdigit():
            return int(span_or_date)
        raise PipelineDefinitionError(f"span {span_or_date!r}: expected a span number or a YYYY-MM-DD date") from None
    return (day - _EPOCH).days


@dataclasses.dataclass(frozen=True)
class Spans:
    """The spans a run reads and, for each, the version read (None without {VERSION})."""

    spans: list[int]
    versions: dict[int, int | None]
    files: dict[int, list[FileMetadata]] = dataclasses.field(default_factory=dict, compare=False)

    def properties(self) -> dict[str, Any]:
        latest = self.spans[-1]
        return {"span": latest, "version": self.versions[latest], "spans": list(self.spans)}


def has_spans(pattern: str) -> bool:
    return any(spec in pattern for spec in _SPECS)


def check_pattern(pattern: str) -> None:
    """A pattern with spans names the span once: {SPAN}, or the whole date {YYYY}, {MM} and {DD}."""
    dated = [p for p in DATE_PARTS if p in pattern]
    if SPAN in pattern and dated:
        raise PipelineDefinitionError(f"input pattern {pattern!r}: use {SPAN} or a date, not both")
    if dated and len(dated) != len(DATE_PARTS):
        raise PipelineDefinitionError(f"input pattern {pattern!r}: a date span needs all of {', '.join(DATE_PARTS)}")
    if VERSION in pattern and SPAN not in pattern and not dated:
        raise PipelineDefinitionError(f"input pattern {pattern!r}: {VERSION} needs a span ({SPAN} or a date)")
    for spec in _SPECS:
        if pattern.count(spec) > 1:
            raise PipelineDefinitionError(f"input pattern {pattern!r}: {spec} appears more than once")


def select(pattern: str, config: RangeConfig) -> tuple[list[FileMetadata], Spans]:
    """The files of the spans `config` picks (each span at its newest version), and which those are."""
    if not remote_fs.is_remote(pattern):
        pattern = os.path.abspath(pattern)
    glob = pattern
    for spec in _SPECS:
        glob = glob.replace(spec, "*")
    regex = _regex(pattern)
    by_span: dict[int, dict[int | None, list[FileMetadata]]] = {}
    for m in match_metadata([glob]):
        found = regex.fullmatch(m.path)
        if found is None:
            continue  # matched the looser glob only (e.g. span-abc/)
        span = _span_of(found, m.path)
        version = int(found.group("version")) if "version" in found.groupdict() else None
        by_span.setdefault(span, {}).setdefault(version, []).append(m)
    if not by_span:
        raise InputDataError(f"input pattern {pattern!r} matches no file with a span: check the path and the pattern")
    present = sorted(by_span)
    if config.kind == "static":
        wanted = list(range(config.start, config.end + 1))
        missing = [s for s in wanted if s not in by_span]
        if missing:
            raise InputDataError(f"input pattern {pattern!r}: spans {missing} have no files; spans found: {present}")
    elif config.kind == "rolling":
        if config.until is not None and config.until not in by_span:
            day = f" ({_EPOCH + datetime.timedelta(days=config.until)})" if DATE_PARTS[0] in pattern else ""
            raise InputDataError(
                f"input pattern {pattern!r}: span {config.until}{day} has no files; spans found: {present}"
            )
        wanted = [s for s in present if config.until is None or s <= config.until][-config.num_spans :]
    else:
        wanted = present[-1:]
    versions = {s: max(by_span[s], key=lambda v: -1 if v is None else v) for s in wanted}
    per_span = {s: sorted(by_span[s][versions[s]], key=lambda m: m.path) for s in wanted}
    files = sorted((m for s in wanted for m in per_span[s]), key=lambda m: m.path)
    return files, Spans(wanted, versions, per_span)


def _regex(pattern: str) -> re.Pattern:
    """The pattern as a regex: specs capture digits, * and ? stay within one path segment."""
    out, i = [], 0
    while i < len(pattern):
        spec = next((s for s in _SPECS if pattern.startswith(s, i)), None)
        if spec is not None:
            out.append(f"(?P<{_GROUPS[spec]}>\\d+)")
            i += len(spec)
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _span_of(found: re.Match, path: str) -> int:
    groups = found.groupdict()
    if "span" in groups:
        return int(groups["span"])
    try:
        day = datetime.date(int(groups["year"]), int(groups["month"]), int(groups["day"]))
    except ValueError as e:
        raise InputDataError(f"{path}: the date in its path is not a date ({e})") from None
    return (day - _EPOCH).days


class SpanRange(ResolverStrategy):
    """For a Resolver: the newest Examples of `producer` whose spans all lie in start..end (output `examples`).

    `start` and `end` are spans or YYYY-MM-DD dates, e.g. to evaluate a model on last week's days:
    `Resolver(SpanRange("2026-11-23", "2026-11-29"), component_id="LastWeek")`.
    """

    output = "examples"
    artifact_type = EXAMPLES

    def __init__(self, start: int | str, end: int | str, *, producer: str = "ExampleGen"):
        self.start, self.end, self.producer = span_of(start), span_of(end), producer
        if self.start > self.end:
            raise PipelineDefinitionError(f"SpanRange({start!r}, {end!r}): the start is after the end")

    def resolve(self, store: Any, pipeline_name: str) -> Artifact | None:
        for examples in store.latest_artifacts(EXAMPLES.name, pipeline_name, {"producer_component": self.producer}):
            spans = examples.properties.get("spans")
            if spans and all(self.start <= s <= self.end for s in spans):
                return examples
        return None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "start": self.start, "end": self.end, "producer": self.producer}
