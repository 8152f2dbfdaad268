"""A test component that holds the job while a test interrupts or kills the launcher.

It writes `<flags>/started` once it runs, then waits (bounded) until `<flags>/release` exists, so a
test acts at a known point of the job instead of after a guessed sleep.
"""

from __future__ import annotations

import os
import time

import apache_beam as beam

from beam_pipeline.artifacts import STATISTICS
from beam_pipeline.dsl import Channel, Component, InputSpec

WAIT_LIMIT_S = 600.0


def _hold(stats, flags: str, split: str, uri: str):
    open(os.path.join(flags, "started"), "a").close()
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not os.path.exists(os.path.join(flags, "release")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{flags}/release did not appear within {WAIT_LIMIT_S:.0f} s")
        time.sleep(0.05)
    os.makedirs(os.path.join(uri, f"Split-{split}"), exist_ok=True)
    with open(os.path.join(uri, f"Split-{split}", "FeatureStats.pb"), "wb") as f:
        f.write(stats.SerializeToString())
    return {"split_names": [split]}


class Hold(Component):
    """Waits for the release flag, then commits an (empty) statistics-typed report."""

    INPUTS = {"statistics": InputSpec(STATISTICS)}
    OUTPUTS = {"report": STATISTICS}

    def __init__(self, *, statistics: Channel, flags: str):
        super().__init__(inputs={"statistics": statistics}, params={"flags": flags}, component_id="Hold")

    def expand(self, inputs):
        flags, uri = self.params["flags"], self.ctx.output_uri("report")
        done = [pc | f"Hold[{s}]" >> beam.Map(_hold, flags, s, uri) for s, pc in inputs["statistics"].items()]
        self.ctx.publish("report", done | beam.Flatten())
        return {"report": inputs["statistics"]}


PIPELINE_FILE = """
import sys
sys.path.insert(0, {repo!r})
from beam_pipeline import Pipeline
from tests._blocking import Hold
from transforms.example_gen import ExampleGen
from transforms.statistics_gen import StatisticsGen


def create_pipeline(pipeline_root={root!r}):
    gen = ExampleGen(input_base={data!r})
    stats = StatisticsGen(examples=gen.outputs.examples)
    hold = Hold(statistics=stats.outputs.statistics, flags={flags!r})
    return Pipeline("held", pipeline_root, [gen, stats, hold])
"""


def write_pipeline_file(path: str, *, repo: str, root: str, data: str, flags: str) -> str:
    """A pipeline file for `beam-pipeline run`: ExampleGen -> StatisticsGen -> Hold."""
    with open(path, "w") as f:
        f.write(PIPELINE_FILE.format(repo=repo, root=root, data=data, flags=flags))
    return path
