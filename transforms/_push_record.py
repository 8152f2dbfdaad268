"""What a serving directory's newest version holds (its push record) and whether a push may shadow it.

Concurrent runs: each run's Evaluator judges its model against a baseline resolved from ML Metadata
at launch, so two runs launched close together judge against the same baseline, and without a check
whichever finishes last would be served, however it compares with the other. A push is therefore a
compare-and-set on the serving directory: right before a version is published, the Pusher reads which
model the newest version holds and pushes only if its own model was judged against that one: nothing
is served yet, or the served model is the blessing's baseline, or that baseline's baseline, and so on
(each blessing means "not worse than my baseline"; the driver resolves the chain from the Evaluator's
blessings in ML Metadata). Otherwise the model was never compared with what is served: pushed=0, and
the message names the served model, its version and the run that pushed it. The next run's Evaluator
takes the served model's blessing as its baseline. The check applies when the Evaluator has change
thresholds, the only case where a blessing is relative to another model; with value thresholds alone
a newer blessed model simply becomes the newest version.

Why the serving directory, not ML Metadata, is the source of truth: the Pusher runs inside the Beam
graph (on a worker on remote runners) and only the driver writes ML Metadata, after it sees commit
markers, so another run's push is visible in the serving directory the moment it is published and in
ML Metadata only when that run's driver next polls. The serving directory is also what TF Serving
serves. Versions written before push records existed are identified by this Pusher's PushedModel
records in ML Metadata; a newest version that neither names (a manual copy) is never assumed to be
worse: a guarded push refuses to shadow it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import artifact_io, remote_fs
from beam_pipeline.errors import PipelineRunError

PUSH_RECORD = os.path.join("assets.extra", "push_record.json")  # inside each version directory
SAVED_MODEL_FILE = "saved_model.pb"  # a version directory is a version, for TF Serving, once this exists
TEMP_PREFIX = ".push-tmp-"  # a push's own upload or copy before it is a version; never an integer, so never served
MAX_VERSION_ATTEMPTS = 100  # versions a push tries to take when racing pushes keep taking the next number
RAW = CompressionTypes.UNCOMPRESSED  # copy bytes as they are: FileSystems would (de)compress a `.gz` asset


@dataclasses.dataclass(frozen=True)
class Served:
    """The newest version under a serving directory and what is known of the model in it."""

    version: int
    destination: str
    model_uri: str | None  # None: neither a push record nor ML Metadata says which model it is
    pushed_by: str | None = None

    @classmethod
    def of(
        cls, version: int, destination: str, record: Mapping[str, Any] | None, known_pushes: Mapping[str, str] | None
    ) -> Served:
        """The model of a version, from its push `record` or else `known_pushes` (destination -> model URI)."""
        if record is not None:
            return cls(version, destination, record["model_uri"], record.get("pushed_by"))
        return cls(version, destination, (known_pushes or {}).get(destination))

    def describe(self) -> str:
        model = f"model {self.model_uri}" if self.model_uri else "a model no push record names"
        by = f", pushed by {self.pushed_by}" if self.pushed_by else ""
        return f"version {self.version} ({model}{by})"


class PushRefused(Exception):
    """The compare-and-set failed: the served model is not one the model to push was judged against."""

    def __init__(self, reason: str, served: Served):
        super().__init__(reason)
        self.served = served


def read_push_record(version_dir: str) -> dict[str, Any] | None:
    """The push record of one version directory; None when it has none (pushed by hand or by an older Pusher)."""
    path = artifact_io.join(version_dir, PUSH_RECORD)
    try:
        if remote_fs.is_remote(path):
            if not FileSystems.exists(path):
                return None
            with FileSystems.open(path, compression_type=RAW) as f:
                record = json.loads(f.read())
        else:
            with open(path) as f:
                record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PipelineRunError(f"push record {path} is unreadable ({e}); expected the JSON a Pusher writes") from None
    if not isinstance(record, dict) or not isinstance(record.get("model_uri"), str):
        raise PipelineRunError(f"push record {path} has no model_uri string; expected the JSON a Pusher writes")
    return record


@dataclasses.dataclass(frozen=True)
class Guard:
    """The compare-and-set condition of one push: which served models its model was judged not worse than."""

    model_uri: str
    baseline_uri: str | None  # the blessing's baseline; None when nothing was blessed before
    judged_against: frozenset[str]  # the baseline, its baseline, ...

    def check(self, served: Served | None) -> None:
        """Raise PushRefused unless pushing over `served` is safe."""
        reason = self.refusal(served)
        if reason is not None and served is not None:  # nothing served is always safe
            raise PushRefused(reason, served)

    def refusal(self, served: Served | None) -> str | None:
        """Why pushing over `served` could regress what is served, or None when it cannot."""
        if served is None or served.model_uri == self.model_uri or served.model_uri in self.judged_against:
            return None
        against = f"baseline {self.baseline_uri}" if self.baseline_uri else "no baseline (nothing was blessed yet)"
        if served.model_uri is None:
            return (
                f"model {self.model_uri} not pushed: the newest version under {os.path.dirname(served.destination)} "
                f"is {served.describe()}, so this model, judged against {against}, was never compared with it. "
                f"Remove {served.destination} if it should not be served, then rerun"
            )
        return (
            f"model {self.model_uri} not pushed: {served.describe()} won; it became the newest version under "
            f"{os.path.dirname(served.destination)} after this model was judged against {against}, and the two "
            "were never compared, so pushing could regress what is served. Rerun the pipeline to judge a "
            f"model against {served.model_uri}"
        )


def judged_against(baseline_uri: str | None, baselines: Mapping[str, list[str]]) -> frozenset[str]:
    """The baseline and, transitively, the baselines its blessings were judged against (model URI -> baselines)."""
    seen: set[str] = set()
    todo = [baseline_uri] if baseline_uri else []
    while todo:
        uri = todo.pop()
        if uri not in seen:
            seen.add(uri)
            todo.extend(baselines.get(uri, ()))
    return frozenset(seen)
