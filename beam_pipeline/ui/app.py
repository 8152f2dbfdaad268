"""The metadata UI's web app: Starlette routes over one ML Metadata store, read only, pages rendered on the server."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.routing import Route

from beam_pipeline import queries, report
from beam_pipeline.errors import BeamPipelineError, MetadataError
from beam_pipeline.ui import views

MAX_HOPS = 8


class _Store:
    """The store, opened on first use and shared; ML Metadata's client is not thread safe, so one request at a time."""

    def __init__(self, uri: str):
        self.uri, self._store, self.lock = uri, None, threading.Lock()

    def get(self) -> Any:
        if self._store is None:
            self._store = queries.open_store(self.uri)  # a missing store: MetadataError, a clear page
        return self._store


def _int(request: Request, name: str, value: str | None = None) -> int:
    text = request.path_params.get(name) if value is None else value
    try:
        return int(text)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{name} must be a whole number, got {text!r}") from None


def create_app(metadata_uri: str, *, tensorboard: Callable[[Any, list[int]], str] | None = None) -> Starlette:
    """The UI over the store at `metadata_uri` (SQLite path or mysql://...). Read only: no page writes to it.

    `tensorboard(store, model_ids)` starts TensorBoard on models and returns its URL (default:
    `queries.start_tensorboard`, kept running for the app's life).
    """
    store, env = _Store(metadata_uri), report.environment()
    boards: dict[tuple[int, ...], str] = {}

    def page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(f"ui/{template}").render(
            store_uri=metadata_uri,
            generated=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def read(build: Callable[[Any], dict[str, Any]], template: str) -> HTMLResponse:
        with store.lock:
            context = build(store.get())
        return page(template, **context)

    def runs(request: Request) -> HTMLResponse:
        q = request.query_params
        return read(lambda s: views.runs_page(s, q.get("pipeline"), q.get("state")), "runs.html.j2")

    def run(request: Request) -> HTMLResponse:
        p = request.path_params
        return read(lambda s: views.run_page(s, p["pipeline"], p["run_id"]), "run.html.j2")

    def execution(request: Request) -> HTMLResponse:
        execution_id = _int(request, "id")
        return read(lambda s: views.execution_page(s, execution_id), "execution.html.j2")

    def executions(request: Request) -> HTMLResponse:
        return read(lambda s: views.executions_page(s, request.path_params["type"]), "executions.html.j2")

    def artifact(request: Request) -> HTMLResponse:
        artifact_id = _int(request, "id")
        hops = _int(request, "hops", request.query_params.get("hops", "2"))
        direction = request.query_params.get("direction", "both")
        if not 1 <= hops <= MAX_HOPS or direction not in ("both", "upstream", "downstream"):
            raise HTTPException(400, f"hops must be 1..{MAX_HOPS} and direction both, upstream or downstream")
        with store.lock:
            s = store.get()
            kind = queries.get_artifact(s, artifact_id).type.name
            if kind == "Model":
                return RedirectResponse(f"/models/{artifact_id}", status_code=303)
            context = views.artifact_page(s, artifact_id, hops, direction)
        return page("artifact.html.j2", **context)

    def statistics(request: Request) -> HTMLResponse:
        artifact_id = _int(request, "id")
        compare = request.query_params.get("compare")
        compare_id = _int(request, "compare", compare) if compare else None
        split, compare_split = request.query_params.get("split"), request.query_params.get("compare_split")
        return read(
            lambda s: views.statistics_page(s, artifact_id, split, compare_id, compare_split), "statistics.html.j2"
        )

    def model(request: Request) -> HTMLResponse:
        model_id = _int(request, "id")
        return read(lambda s: views.model_page(s, model_id, request.query_params.get("slice")), "model.html.j2")

    def compare(request: Request) -> HTMLResponse:
        lhs, rhs = _int(request, "lhs"), _int(request, "rhs")
        return read(lambda s: views.compare_page(s, lhs, rhs), "compare.html.j2")

    def compare_form(request: Request) -> RedirectResponse:
        q = request.query_params
        return RedirectResponse(
            f"/compare/{_int(request, 'lhs', q.get('lhs'))}/{_int(request, 'rhs', q.get('rhs'))}", 303
        )

    def start_board(request: Request) -> RedirectResponse:
        ids = tuple(
            sorted({_int(request, "id"), *(_int(request, "with", v) for v in request.query_params.getlist("with"))})
        )
        with store.lock:
            s = store.get()
            if ids not in boards:
                boards[ids] = (tensorboard or _tensorboard)(s, list(ids))
        return RedirectResponse(boards[ids], status_code=303)

    async def not_found(request: Request, exc: Exception) -> HTMLResponse:
        return page("error.html.j2", status=404, title="Not found", message=str(exc))

    async def http_error(request: Request, exc: HTTPException) -> HTMLResponse:
        return page(
            "error.html.j2",
            status=exc.status_code,
            title="Bad request" if exc.status_code == 400 else "Not found",
            message=exc.detail,
        )

    async def pipeline_error(request: Request, exc: BeamPipelineError) -> HTMLResponse:
        return page("error.html.j2", status=422, title="Cannot show this", message=str(exc))

    routes = [
        Route("/", runs),
        Route("/runs/{pipeline}/{run_id}", run),
        Route("/executions/{id}", execution),
        Route("/types/{type}", executions),
        Route("/artifacts/{id}", artifact),
        Route("/artifacts/{id}/statistics", statistics),
        Route("/models/{id}", model),
        Route("/models/{id}/tensorboard", start_board, methods=["POST"]),
        Route("/compare", compare_form),
        Route("/compare/{lhs}/{rhs}", compare),
    ]
    handlers = {MetadataError: not_found, HTTPException: http_error, BeamPipelineError: pipeline_error}
    return Starlette(routes=routes, exception_handlers=handlers)


def _tensorboard(store: Any, model_ids: list[int]) -> str:
    return queries.start_tensorboard(store, model_ids).url
