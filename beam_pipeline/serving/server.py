"""The REST app: TF Serving's URLs and JSON on FastAPI, served by uvicorn.

Handlers read the body themselves (to enforce the size limit while streaming and to keep the per-request
cost low) and declare the request schemas in `openapi_extra`, so /openapi.json still describes every
route for clients and fuzzers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorflow as tf
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from beam_pipeline.serving import codec
from beam_pipeline.serving.batching import Batcher
from beam_pipeline.serving.errors import BadRequestError, RequestTooLargeError, ServableNotFoundError, ServingRequestError
from beam_pipeline.serving.models import (
    LABEL_RE,
    MODEL_NAME_RE,
    ModelManager,
    Servable,
    SignatureInfo,
    parse_version,
)

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
EXAMPLES_SIGNATURE = "from_examples"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `create_app` needs; the CLI flags map one to one onto these fields."""

    model_base_path: str
    model_name: str
    enable_batching: bool = True
    max_batch_size: int = 64
    batch_timeout_ms: float = 1.0
    poll_interval_s: float = 1.0
    max_request_bytes: int = 10 * 1024 * 1024
    num_versions: int = 1
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)
    model_threads: int = max(2, os.cpu_count() or 2)

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.model_threads < 1:
            raise ValueError(f"model_threads must be >= 1, got {self.model_threads}")


def _json(payload: Any, status_code: int = 200) -> Response:
    return Response(codec.dumps(payload), status_code=status_code, media_type="application/json")


_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_ERROR_RESPONSES = {
    str(code): {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for code, text in [(400, "bad request"), (404, "no such model, version or label"), (413, "body too large")]
}
_ANY_JSON: dict[str, Any] = {}
_REQUEST_SCHEMAS = {
    "predict": {
        "type": "object",
        "properties": {
            "signature_name": {"type": "string"},
            "instances": {"type": "array", "items": _ANY_JSON},
            "inputs": _ANY_JSON,
        },
    },
    "classify": {
        "type": "object",
        "properties": {
            "signature_name": {"type": "string"},
            "context": {"type": "object"},
            "examples": {"type": "array", "items": {"type": "object"}},
        },
        "required": ["examples"],
    },
}
_REQUEST_SCHEMAS["regress"] = _REQUEST_SCHEMAS["classify"]


class ModelServer:
    """Request handling for one model; `create_app` wires it into FastAPI and its lifespan."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.manager = ModelManager(
            config.model_base_path,
            config.model_name,
            num_versions=config.num_versions,
            version_labels=config.version_labels,
        )
        self._executor: ThreadPoolExecutor | None = None
        self.batcher = (
            Batcher(self._run_in_thread, config.max_batch_size, config.batch_timeout_ms / 1000.0)
            if config.enable_batching
            else None
        )

    # -- lifecycle -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        self._executor = ThreadPoolExecutor(self.config.model_threads, thread_name_prefix="model")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.manager.poll_once)
        self.manager.start_polling(self.config.poll_interval_s)
        try:
            yield
        finally:
            await loop.run_in_executor(None, self.manager.stop)
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _run_in_thread(self, servable: Servable, signature: str, inputs: Mapping[str, np.ndarray]) -> dict:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, servable.run, signature, inputs)

    async def _run(self, servable: Servable, sig: SignatureInfo, inputs: Mapping[str, np.ndarray]) -> dict:
        rows = {v.shape[0] if v.ndim else -1 for v in inputs.values()}
        if self.batcher is not None and sig.batched and len(rows) == 1 and min(rows) >= 0:
            return await self.batcher.run(servable, sig.name, inputs, rows.pop())
        return await self._run_in_thread(servable, sig.name, inputs)

    # -- request parsing -----------------------------------------------------------------------
    def _target(self, model_name: str, version: str | None, label: str | None) -> tuple[int | None, str | None]:
        if not MODEL_NAME_RE.match(model_name):
            raise BadRequestError(f"invalid model name {model_name[:40]!r}: must match {MODEL_NAME_RE.pattern}")
        if label is not None and not LABEL_RE.match(label):
            raise BadRequestError(f"invalid version label {label[:40]!r}: must match {LABEL_RE.pattern}")
        parsed = parse_version(version) if version is not None else None
        if model_name != self.config.model_name:
            spec = f"Specific({model_name}, {parsed})" if parsed is not None else f"Latest({model_name})"
            raise ServableNotFoundError(f"Servable not found for request: {spec}")
        return parsed, label

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestTooLargeError(f"request body of {length} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLargeError(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return codec.parse_json_object(b"".join(chunks))

    # -- handlers ------------------------------------------------------------------------------
    async def status(self, request: Request, model_name: str, version: str | None, label: str | None) -> Response:
        parsed, label = self._target(model_name, version, label)
        return _json({"model_version_status": self.manager.status(parsed, label)})

    async def metadata(self, request: Request, model_name: str, version: str | None, label: str | None) -> Response:
        parsed, label = self._target(model_name, version, label)
        with self.manager.acquire(parsed, label) as servable:
            return _json(
                {
                    "model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
                    "metadata": {"signature_def": servable.signature_def_json},
                }
            )

    async def predict(self, request: Request, model_name: str, version: str | None, label: str | None) -> Response:
        parsed, label = self._target(model_name, version, label)
        payload = await self._body(request)
        sig_name = codec.signature_name(payload, DEFAULT_SIGNATURE)
        if ("instances" in payload) == ("inputs" in payload):
            raise BadRequestError("the request must have exactly one of 'instances' (row format) or 'inputs' (columnar)")
        with self.manager.acquire(parsed, label) as servable:
            sig = servable.signature(sig_name)
            if "instances" in payload:
                inputs = codec.decode_instances(payload["instances"], sig)
                outputs = await self._run(servable, sig, inputs)
                rows = len(payload["instances"])
                return _json({"predictions": codec.encode_predictions(outputs, rows)})
            inputs = codec.decode_inputs(payload["inputs"], sig)
            outputs = await self._run(servable, sig, inputs)
            return _json({"outputs": codec.encode_outputs(outputs)})

    async def _run_examples(self, servable: Servable, payload: dict[str, Any]) -> tuple[dict, int]:
        default = EXAMPLES_SIGNATURE if EXAMPLES_SIGNATURE in servable.signatures else DEFAULT_SIGNATURE
        sig = servable.signature(codec.signature_name(payload, default))
        input_name, info = next(iter(sig.inputs.items()), (None, None))
        if len(sig.inputs) != 1 or info.dtype != tf.string or info.shape is None or len(info.shape) != 1:
            raise BadRequestError(
                f"signature {sig.name!r} does not take serialized tf.Examples (one string input of shape [None])"
            )
        raw = servable.signatures.get(DEFAULT_SIGNATURE)
        hints = raw.inputs if raw is not None and raw is not sig else None
        examples = codec.encode_examples(payload, hints)
        return await self._run(servable, sig, {input_name: examples}), len(examples)

    async def classify(self, request: Request, model_name: str, version: str | None, label: str | None) -> Response:
        parsed, label = self._target(model_name, version, label)
        payload = await self._body(request)
        with self.manager.acquire(parsed, label) as servable:
            outputs, rows = await self._run_examples(servable, payload)
            return _json({"results": codec.classification_results(outputs, rows)})

    async def regress(self, request: Request, model_name: str, version: str | None, label: str | None) -> Response:
        parsed, label = self._target(model_name, version, label)
        payload = await self._body(request)
        with self.manager.acquire(parsed, label) as servable:
            outputs, rows = await self._run_examples(servable, payload)
            return _json({"results": codec.regression_results(outputs, rows)})


Handler = Callable[[Request, str, "str | None", "str | None"], Awaitable[Response]]


def _endpoint(handler: Handler, selector: str | None) -> Callable[..., Awaitable[Response]]:
    # FastAPI reads path parameters (and documents them) from the endpoint's signature.
    if selector is None:
        async def latest(request: Request, model_name: str) -> Response:
            return await handler(request, model_name, None, None)
        return latest
    if selector == "version":
        async def by_version(request: Request, model_name: str, version: str) -> Response:
            return await handler(request, model_name, version, None)
        return by_version

    async def by_label(request: Request, model_name: str, label: str) -> Response:
        return await handler(request, model_name, None, label)
    return by_label


def create_app(model_base_path: str, model_name: str, **options: Any) -> FastAPI:
    """The ASGI app serving `model_base_path/<version>/` as `model_name`; `options` are ServerConfig fields.

    Versions are loaded when the app starts (its lifespan) and the base path is polled from then on.
    `app.state.server` is the ModelServer (its `manager` and `batcher` are useful in tests).
    """
    server = ModelServer(ServerConfig(model_base_path, model_name, **options))
    app = FastAPI(
        title="beam-pipeline model server",
        description="TensorFlow Serving compatible REST API for the models the Pusher writes.",
        lifespan=server.lifespan,
    )
    app.state.server = server
    selectors = [("", None), ("/versions/{version}", "version"), ("/labels/{label}", "label")]
    for suffix, selector in selectors:
        base = "/v1/models/{model_name}" + suffix
        kind = selector or "latest"
        app.add_api_route(base, _endpoint(server.status, selector), methods=["GET"], name=f"status_{kind}",
                          summary="Model version status", responses=_ERROR_RESPONSES)
        app.add_api_route(f"{base}/metadata", _endpoint(server.metadata, selector), methods=["GET"],
                          name=f"metadata_{kind}", summary="Signature metadata", responses=_ERROR_RESPONSES)
        for verb in ("predict", "classify", "regress"):
            app.add_api_route(
                f"{base}:{verb}",
                _endpoint(getattr(server, verb), selector),
                methods=["POST"],
                name=f"{verb}_{kind}",
                summary=verb.capitalize(),
                responses=_ERROR_RESPONSES,
                openapi_extra={
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _REQUEST_SCHEMAS[verb]}},
                    }
                },
            )

    @app.exception_handler(ServingRequestError)
    async def request_error(_request: Request, exc: ServingRequestError) -> Response:
        return _json({"error": str(exc)}, exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return _json({"error": str(exc.detail)}, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _json({"error": f"internal error: {type(exc).__name__}"}, 500)

    return app


def serve(model_base_path: str, model_name: str, *, host: str = "127.0.0.1", port: int = 8501,
          log_level: str = "info", **options: Any) -> None:
    """Serve until interrupted (blocking). `options` are ServerConfig fields."""
    app = create_app(model_base_path, model_name, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
