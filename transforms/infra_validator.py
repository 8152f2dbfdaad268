"""InfraValidator: serve the candidate with `beam-pipeline serve` and send it real rows before a push."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa

from beam_pipeline import artifact_io
from beam_pipeline.artifacts import EXAMPLES, INFRA_BLESSING, MODEL, Artifact
from beam_pipeline.dsl import Channel, Component, InputSpec
from beam_pipeline.errors import PipelineDefinitionError
from transforms._tf_examples import serialize_rows
from transforms.push_model import push_model

SERVING_MODEL_DIR = "Format-Serving"
INFRA_BLESSED_FILE, INFRA_NOT_BLESSED_FILE = "INFRA_BLESSED", "INFRA_NOT_BLESSED"
_MODEL_NAME = "infra"
_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
_POLL_S = 0.2


class InfraValidator(Component):
    """Serve the model in a `beam-pipeline serve` process of its own and send it `num_examples` rows.

    The rows come from split `split` of `examples`, as serialized tf.Examples to `signature` (the
    taxi model's `from_examples`), through the server's TF Serving REST API. Output `blessing`
    (InfraBlessing): infra_blessed=1 when the model loaded and answered every row, else 0 with why
    (the server's error, or the end of its log), in `INFRA_BLESSED` / `INFRA_NOT_BLESSED`. A Pusher
    given `infra_blessing` pushes only an infra-blessed model. `load_timeout_s` bounds the wait
    for the server to load the model; it is not part of the cache key.
    """

    INPUTS = {"model": InputSpec(MODEL), "examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"blessing": INFRA_BLESSING}

    def __init__(
        self,
        *,
        model: Channel,
        examples: Channel,
        split: str = "eval",
        num_examples: int = 10,
        signature: str = "from_examples",
        load_timeout_s: float = 300.0,
        component_id: str | None = None,
    ):
        if num_examples < 1:
            raise PipelineDefinitionError(f"num_examples={num_examples}: send at least one row")
        if not load_timeout_s > 0:
            raise PipelineDefinitionError(f"load_timeout_s={load_timeout_s!r}: expected a positive number")
        super().__init__(
            inputs={"model": model, "examples": examples},
            params={"split": split, "num_examples": num_examples, "signature": signature},
            component_id=component_id,
        )
        self.load_timeout_s = float(load_timeout_s)

    def splits_read(self, name: str, splits: Sequence[str]) -> list[str]:
        return [s for s in splits if s == self.params["split"]]

    def static_outputs(self, input_static: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        splits = input_static["examples"].get("splits")
        if splits is not None and self.params["split"] not in splits:
            raise PipelineDefinitionError(f"{self.id}: split {self.params['split']!r} is not one of {splits}")
        return {"blessing": {}}

    def expand(self, inputs: dict[str, Any]) -> dict[str, Any]:
        n = self.params["num_examples"]
        rows = (
            inputs["examples"][self.params["split"]]
            | "FirstRows" >> beam.Map(lambda batch: batch.slice(0, n))
            | "Gather" >> beam.combiners.ToList()  # a slice per batch, never the split
        )
        validate = _Validate(
            artifact_io.join(self.ctx.input_uris["model"], SERVING_MODEL_DIR),
            self.ctx.output_uri("blessing"),
            n,
            self.params["signature"],
            self.load_timeout_s,
        )
        blessing = rows | "Validate" >> beam.Map(validate, beam.pvalue.AsSingleton(self.ctx.committed_inputs["model"]))
        self.ctx.publish("blessing", blessing)
        return {}


class _Validate:
    def __init__(self, model_dir: str, blessing_uri: str, num_examples: int, signature: str, timeout_s: float):
        self.model_dir, self.blessing_uri, self.n = model_dir, blessing_uri, num_examples
        self.signature, self.timeout_s = signature, timeout_s

    def __call__(self, slices: list[pa.RecordBatch], model: Artifact) -> dict[str, Any]:
        from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

        batches = [b for b in slices if b.num_rows]
        if not batches:
            verdict = (False, "the examples split has no rows to send")
        else:
            table = pa.Table.from_batches(batches).slice(0, self.n).combine_chunks()
            rows = serialize_rows(RecordBatchToExamplesEncoder(), table.to_batches()[0])
            verdict = self._serve_and_send(rows)
        blessed, message = verdict
        name = INFRA_BLESSED_FILE if blessed else INFRA_NOT_BLESSED_FILE
        artifact_io.write_text(artifact_io.join(self.blessing_uri, name), message + "\n")
        return {"infra_blessed": int(blessed), "infra_message": message, "model_uri": model.uri}

    def _serve_and_send(self, rows: list[bytes]) -> tuple[bool, str]:
        with tempfile.TemporaryDirectory(prefix="bp-infra-") as scratch:
            base = os.path.join(scratch, "models")
            push_model(self.model_dir, base)  # version 1, the layout the server watches
            log_path = os.path.join(scratch, "serve.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "beam_pipeline", "serve", "--model_base_path", base,
                     "--model_name", _MODEL_NAME, "--port", "0"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            try:
                return self._check(proc, log_path, rows)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _check(self, proc: subprocess.Popen, log_path: str, rows: list[bytes]) -> tuple[bool, str]:
        deadline = time.monotonic() + self.timeout_s
        url = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False, f"the model server exited with {proc.returncode}: {_tail(log_path)}"
            if url is None:
                found = _RUNNING.search(_read(log_path))
                if found:
                    url = f"http://127.0.0.1:{found.group(1)}/v1/models/{_MODEL_NAME}"
            if url is not None:
                state = _state(url)
                if state.get("state") == "AVAILABLE":
                    return self._predict(url, rows)
                if state.get("state") == "END":
                    error = state.get("status", {}).get("error_message") or _tail(log_path)
                    return False, f"the model server could not load the model: {error}"
            time.sleep(_POLL_S)
        return False, f"the model server did not load the model within {self.timeout_s:g} s: {_tail(log_path)}"

    def _predict(self, url: str, rows: list[bytes]) -> tuple[bool, str]:
        body = {"signature_name": self.signature, "instances": [{"b64": base64.b64encode(r).decode()} for r in rows]}
        request = urllib.request.Request(
            f"{url}:predict", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            return False, f"the model server answered {len(rows)} rows with HTTP {e.code}: {detail}"
        except (urllib.error.URLError, TimeoutError) as e:
            return False, f"the model server did not answer: {e}"
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(rows):
            return False, f"the model server answered {len(rows)} rows with {str(answer)[:500]}"
        return True, f"loaded in the model server and answered {len(rows)} rows of signature {self.signature}"


def _state(url: str) -> dict[str, Any]:
    """The newest version's status, or {} while the server cannot say."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            statuses = json.loads(response.read()).get("model_version_status") or [{}]
    except (urllib.error.URLError, TimeoutError, ValueError):
        return {}
    return statuses[0]


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _tail(path: str, lines: int = 15) -> str:
    return " | ".join(line.strip() for line in _read(path).splitlines()[-lines:] if line.strip())
