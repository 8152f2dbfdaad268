"""What a run reports: each component's state, execution and artifacts."""

from __future__ import annotations

import dataclasses

from beam_pipeline.artifacts import Artifact

PENDING, RUNNING, COMPLETE, CACHED, FAILED, CANCELED = "PENDING", "RUNNING", "COMPLETE", "CACHED", "FAILED", "CANCELED"


@dataclasses.dataclass
class ComponentResult:
    id: str
    type: str
    state: str = PENDING
    execution_id: int | None = None
    busy_s: float | None = None  # processing time the runner measured in its transforms
    artifacts: dict[str, Artifact] = dataclasses.field(default_factory=dict)
    end_time_ms: int | None = None


@dataclasses.dataclass
class RunResult:
    pipeline_name: str
    pipeline_root: str
    run_id: str
    metadata_uri: str
    components: dict[str, ComponentResult]
    error: str | None = None
    start_ms: int = 0

    @property
    def succeeded(self) -> bool:
        return self.error is None

    def artifact(self, component_id: str, output: str) -> Artifact:
        return self.components[component_id].artifacts[output]
