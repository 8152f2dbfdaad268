"""The REST app: TF Serving's URLs and JSON on Starlette, served by uvicorn.

Starlette rather than FastAPI because on a small model the web framework is most of the cost of a
request: on the 2-core development machine a bare FastAPI route served half the requests per second of
the same Starlette route. The OpenAPI document FastAPI would have generated is built from the same route
table instead and served at /openapi.json.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from beam_pipeline import remote_fs
from beam_pipeline.serving import codec
from beam_pipeline.serving.batching import Batcher
from beam_pipeline.serving.errors import (
    BadRequestError,
    RequestTooLargeError,
    ServableNotFoundError,
    ServingRequestError,
)
from beam_pipeline.serving.models import ModelManager, Servable, SignatureInfo
from beam_pipeline.serving.names import LABEL_RE, MODEL_NAME_RE, parse_version

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
    # A version that fails to load is retried when its directory changes, else after this backoff.
    load_retry_initial_s: float = 2.0
    load_retry_max_s: float = 120.0
    # Keep Python's full garbage collections (~0.5 s with TensorFlow loaded) out of request handling.
    freeze_gc: bool = True

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.model_threads < 1:
            raise ValueError(f"model_threads must be >= 1, got {self.model_threads}")


def _examples_input(sig: SignatureInfo) -> str | None:
    """The input name of a signature that takes a batch of serialized tf.Examples, else None."""
    if len(sig.inputs) != 1:
        return None
    name, info = next(iter(sig.inputs.items()))
    return name if info.kind == "string" and info.shape is not None and len(info.shape) == 1 else None


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
    """Request handling for one model; `create_app` wires it into the app and its lifespan."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.manager = ModelManager(
            config.model_base_path,
            config.model_name,
            num_versions=config.num_versions,
            version_labels=config.version_labels,
            freeze_gc=config.freeze_gc,
            load_retry_initial_s=config.load_retry_initial_s,
            load_retry_max_s=config.load_retry_max_s,
        )
        self._executor: ThreadPoolExecutor | None = None
        self.batcher = (
            Batcher(self._run_in_thread, config.max_batch_size, config.batch_timeout_ms / 1000.0)
            if config.enable_batching
            else None
        )

    # -- lifecycle -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
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
    def _target(self, params: Mapping[str, str]) -> tuple[int | None, str | None]:
        """Validate the model name, version and label of a URL; return (version, label) to acquire."""
        model_name, version, label = params["model_name"], params.get("version"), params.get("label")
        if not MODEL_NAME_RE.fullmatch(model_name):
            raise BadRequestError(f"invalid model name {model_name[:40]!r}: must match {MODEL_NAME_RE.pattern}")
        if label is not None and not LABEL_RE.fullmatch(label):
            raise BadRequestError(f"invalid version label {label[:40]!r}: must match {LABEL_RE.pattern}")
        parsed = parse_version(version) if version is not None else None
        if model_name != self.config.model_name:
            spec = f"Specific({model_name}, {parsed})" if parsed is not None else f"Latest({model_name})"
            raise ServableNotFoundError(f"Servable not found for request: {spec}")
        if label is not None and label not in self.config.version_labels:
            raise ServableNotFoundError(f"Unrecognized servable version label: {label}")
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
    async def status(self, request: Request) -> Response:
        parsed, label = self._target(request.path_params)
        return _json({"model_version_status": self.manager.status(parsed, label)})

    async def metadata(self, request: Request) -> Response:
        parsed, label = self._target(request.path_params)
        with self.manager.acquire(parsed, label) as servable:
            return _json(
                {
                    "model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
                    "metadata": {"signature_def": servable.signature_def_json},
                }
            )

    async def predict(self, request: Request) -> Response:
        parsed, label = self._target(request.path_params)
        payload = await self._body(request)
        sig_name = codec.signature_name(payload, DEFAULT_SIGNATURE)
        if ("instances" in payload) == ("inputs" in payload):
            raise BadRequestError("the request needs exactly one of 'instances' (row format) or 'inputs' (columnar)")
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
        input_name = _examples_input(sig)
        if input_name is None:
            raise BadRequestError(
                f"signature {sig.name!r} does not take serialized tf.Examples (one string input of shape [None])"
            )
        # The raw-feature signature, when there is one, tells each feature's type and which features exist.
        raw = servable.signatures.get(DEFAULT_SIGNATURE)
        hints = raw.inputs if raw is not None and _examples_input(raw) is None else None
        examples = codec.encode_examples(payload, hints)
        return await self._run(servable, sig, {input_name: examples}), len(examples)

    async def classify(self, request: Request) -> Response:
        parsed, label = self._target(request.path_params)
        payload = await self._body(request)
        with self.manager.acquire(parsed, label) as servable:
            outputs, rows = await self._run_examples(servable, payload)
            return _json({"results": codec.classification_results(outputs, rows)})

    async def regress(self, request: Request) -> Response:
        parsed, label = self._target(request.path_params)
        payload = await self._body(request)
        with self.manager.acquire(parsed, label) as servable:
            outputs, rows = await self._run_examples(servable, payload)
            return _json({"results": codec.regression_results(outputs, rows)})


@dataclasses.dataclass(frozen=True)
class _RouteSpec:
    path: str
    method: str
    handler: Callable[[Request], Awaitable[Response]]
    operation_id: str
    summary: str
    body: str | None = None  # key of _REQUEST_SCHEMAS


def _route_table(server: ModelServer) -> list[_RouteSpec]:
    selectors = [("", "latest"), ("/versions/{version}", "version"), ("/labels/{label}", "label")]
    table = [
        # Inference routes first: Starlette tries routes in order and these are the hot ones.
        _RouteSpec(
            f"/v1/models/{{model_name}}{suffix}:{verb}",
            "POST",
            getattr(server, verb),
            f"{verb}_{kind}",
            f"{verb.capitalize()} ({kind} version)",
            verb,
        )
        for verb in ("predict", "classify", "regress")
        for suffix, kind in selectors
    ]
    for suffix, kind in selectors:
        base = f"/v1/models/{{model_name}}{suffix}"
        table.append(_RouteSpec(base, "GET", server.status, f"status_{kind}", f"Version status ({kind} version)"))
        table.append(
            _RouteSpec(
                f"{base}/metadata", "GET", server.metadata, f"metadata_{kind}", f"Signature metadata ({kind} version)"
            )
        )
    return table


def _openapi(table: list[_RouteSpec]) -> dict[str, Any]:
    """OpenAPI 3.1 description of the routes, for clients and for API fuzzers such as schemathesis."""
    paths: dict[str, dict[str, Any]] = {}
    for route in table:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.operation_id,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in ("model_name", "version", "label")
                if f"{{{name}}}" in route.path
            ],
            "responses": {"200": {"description": "success", "content": {"application/json": {"schema": {}}}}}
            | _ERROR_RESPONSES,
        }
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _REQUEST_SCHEMAS[route.body]}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "beam-pipeline model server",
            "version": "1",
            "description": "TensorFlow Serving compatible REST API for the models the Pusher writes.",
        },
        "paths": paths,
    }


KEEP_ALIVE_S = 75


def create_app(model_base_path: str, model_name: str, **options: Any) -> Starlette:
    """The ASGI app serving `model_base_path/<version>/` as `model_name`; `options` are ServerConfig fields.

    Versions are loaded when the app starts (its lifespan) and the base path is polled from then on.
    `app.state.server` is the ModelServer (its `manager` and `batcher` are useful in tests).
    """
    server = ModelServer(ServerConfig(model_base_path, model_name, **options))
    table = _route_table(server)
    schema = _openapi(table)

    async def openapi(_request: Request) -> Response:
        return _json(schema)

    async def request_error(_request: Request, exc: ServingRequestError) -> Response:
        return _json({"error": str(exc)}, exc.status_code)

    async def http_error(_request: Request, exc: HTTPException) -> Response:
        return _json({"error": str(exc.detail)}, exc.status_code)

    async def internal_error(_request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this response, so uvicorn logs the traceback.
        return _json({"error": f"internal error: {type(exc).__name__}"}, 500)

    app = Starlette(
        routes=[Route(r.path, r.handler, methods=[r.method]) for r in table]
        + [Route("/openapi.json", openapi, methods=["GET"])],
        exception_handlers={ServingRequestError: request_error, HTTPException: http_error, Exception: internal_error},
        lifespan=server.lifespan,
    )
    app.state.server = server
    return app


_WORKER_SETTINGS_ENV = "BEAM_PIPELINE_SERVE_SETTINGS"


def app_from_env() -> Starlette:
    """App factory run in each worker process of `serve(workers=N)`, which passes its settings in the environment."""
    settings = json.loads(os.environ[_WORKER_SETTINGS_ENV])
    _set_log_level(settings.pop("log_level"))
    app = create_app(**settings)
    if remote_fs.used_s3():  # tensorflow-io would abort this worker at exit (see remote_fs.exit_now)
        atexit.register(remote_fs.exit_now, 0)
    return app


def _set_log_level(log_level: str) -> None:
    logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")  # a no-op if logging is set up
    logging.getLogger("beam_pipeline.serving").setLevel(log_level.upper())


def serve(
    model_base_path: str,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8501,
    log_level: str = "info",
    workers: int = 1,
    **options: Any,
) -> None:
    """Serve until interrupted (blocking). `options` are ServerConfig fields.

    `workers` > 1 runs that many server processes on the port (uvicorn's supervisor): each loads the
    model and batches on its own. Python runs one thread at a time, so processes are how one server
    uses more than one core for request handling; the price is memory, one copy of the model each.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _set_log_level(log_level)
    app = create_app(model_base_path, model_name, **options)  # also checks the settings, once, here
    if workers > 1:  # uvicorn's supervisor starts the workers, each building its app from the environment
        settings = {"model_base_path": model_base_path, "model_name": model_name, "log_level": log_level, **options}
        os.environ[_WORKER_SETTINGS_ENV] = json.dumps(settings)
    uvicorn.run(
        app if workers == 1 else f"{__name__}:app_from_env",
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,  # nothing here reads the client address that X-Forwarded-For would rewrite
        # uvicorn's 5 s default closes idle keep-alive connections; when loading a new version holds
        # the GIL for seconds, the close can race a request a client already sent on that connection,
        # which then fails. Clients' pools idle out well before this.
        timeout_keep_alive=KEEP_ALIVE_S,
    )
