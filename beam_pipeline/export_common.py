"""What an orchestrator's task runs: the `beam-pipeline run` command line of a pipeline file, checked at export time."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys

from beam_pipeline.errors import PipelineDefinitionError

DEFAULT_DATE_PARAM = "date"


@dataclasses.dataclass(frozen=True)
class LaunchCommand:
    """`<command> run <file> [--pipeline-root R] [--metadata-uri M] [--param k=v]... [beam args]`."""

    pipeline_file: str
    pipeline_name: str
    command: tuple[str, ...]
    pipeline_root: str | None = None
    metadata_uri: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    beam_args: tuple[str, ...] = ()
    date_param: str | None = None

    def argv(self, date: str | None = None) -> list[str]:
        """The command's words; `date` (a value or an orchestrator's placeholder) goes to the date parameter."""
        words = [*self.command, "run", self.pipeline_file]
        if self.pipeline_root:
            words += ["--pipeline-root", self.pipeline_root]
        if self.metadata_uri:
            words += ["--metadata-uri", self.metadata_uri]
        for name, value in self.params:
            words += ["--param", f"{name}={value}"]
        if date is not None and self.date_param:
            words += ["--param", f"{self.date_param}={date}"]
        return words + list(self.beam_args)


def this_command() -> tuple[str, ...]:
    """How to start this installation's command line: its console script, else `python -m beam_pipeline`."""
    script = os.path.join(os.path.dirname(sys.executable), "beam-pipeline")
    return (script,) if os.path.exists(script) else (sys.executable, "-m", "beam_pipeline")


def launch_command(
    pipeline_file: str,
    *,
    params: dict[str, str],
    pipeline_root: str | None = None,
    metadata_uri: str | None = None,
    beam_args: tuple[str, ...] = (),
    date_param: str | None = None,
    sample_date: str = "1970-01-01",
    command: tuple[str, ...] | None = None,
    file_as_given: bool = False,
) -> LaunchCommand:
    """Load the pipeline once, as a scheduled run would (with `sample_date`), so a bad file or parameter
    fails the export rather than the first run; the date parameter is `date_param`, or `date` when
    create_pipeline() takes one."""
    from beam_pipeline.pipeline_file import pipeline_from, user_module

    module = user_module(pipeline_file)
    create = getattr(module, "create_pipeline", None)
    takes = inspect.signature(create).parameters if create is not None else {}
    if date_param is None:
        date_param = DEFAULT_DATE_PARAM if DEFAULT_DATE_PARAM in takes else None
    elif date_param not in takes:
        raise PipelineDefinitionError(
            f"{pipeline_file}: --date-param {date_param!r}: create_pipeline() has no such parameter "
            f"(it takes: {', '.join(takes) or 'none'})"
        )
    if date_param in params:
        raise PipelineDefinitionError(f"--param {date_param}=...: the schedule sets {date_param!r}, each run its own")
    checked = dict(params, **({date_param: sample_date} if date_param else {}))
    pipeline = pipeline_from(module, pipeline_file, pipeline_root, checked)
    return LaunchCommand(
        pipeline_file=pipeline_file if file_as_given else os.path.abspath(pipeline_file),
        pipeline_name=pipeline.name,
        command=command or this_command(),
        pipeline_root=pipeline_root or pipeline.root,  # fixed now: a worker's working directory is not the user's
        metadata_uri=metadata_uri,
        params=tuple(params.items()),
        beam_args=tuple(beam_args),
        date_param=date_param,
    )
