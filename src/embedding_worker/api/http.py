"""The HTTP surface of every dialect (`routes.ROUTES`): read the body, call the core, serialise.
No logic of its own.

Mounted into the BentoML service with `@bentoml.asgi_app`; built over the process's `Core`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.routing import Route as StarletteRoute

from ..core.core import Core
from ..core.encoding import dumps
from ..core.errors import APIError, BadRequest, InternalError, MethodNotAllowed, NotFound
from ..core.schemas import ErrorResponse, RunSyncRequest, RunSyncResponse, runsync_response
from ..observability.logs import annotate
from . import openapi, pages
from .jobs import run_job
from .routes import ROUTES, TEI_ROUTES, Operation, Route, dialect_of

logger = logging.getLogger("embedding_worker")

JSON = "application/json"
TITLE = "infinity-embedding-worker"
SUMMARY = "OpenAI-compatible embeddings and reranking over Infinity engines"
DISTRIBUTION = "infinity-embedding-worker"


def error_body(error: APIError, path: str) -> bytes:
    """The error in the shape its dialect's clients read: TEI's on TEI's routes (and on `/rerank`
    with TEI's body), else OpenAI's envelope."""
    shape = error.shape or dialect_of(path)
    return dumps(error.tei_envelope() if shape == "tei" else error.envelope())


def error_response(error: APIError, path: str = "") -> Response:
    return Response(error_body(error, path), status_code=error.status, media_type=JSON,
                    headers=error.headers)


# nginx's "client closed request": logged, never seen by the client that left
CLIENT_CLOSED = 499

Handler = Callable[[Request, Any], Awaitable[Response]]


def cancelled_on_disconnect(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that runs `handler` on the request and its JSON body and cancels it if the
    client disconnects first, so that its items stop taking engine time (the batchers withdraw
    them, infinity skips them). The body is read before watching: both would `receive()`."""

    async def run(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except ClientDisconnect:  # gone before its body arrived: nothing to answer or to log as ours
            annotate(outcome="client disconnected")
            return Response(status_code=CLIENT_CLOSED)
        task = asyncio.ensure_future(handler(request, body))

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # let the cancellation reach the engine call
        if task.cancelled():
            annotate(outcome="client disconnected")
            return Response(status_code=CLIENT_CLOSED)
        return task.result()

    return run


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def create_app(core: Core) -> Starlette:
    routes: list[BaseRoute] = []
    documented: list[openapi.Operation] = []

    def add(path: str, route: Route, operation: Operation, doc: bool) -> None:
        """One path of `route`; a TEI path under /tei/ takes its model from the path."""
        if route.request is None:
            async def endpoint(request: Request) -> Response:
                return Response(dumps(await operation(None, request.path_params.get("model"))),
                                media_type=JSON)
        else:
            @cancelled_on_disconnect
            async def endpoint(request: Request, body: Any) -> Response:
                result = await operation(body, request.path_params.get("model"))
                return Response(dumps(result), media_type=JSON)

        routes.append(StarletteRoute(path, endpoint, methods=[route.method], name=path))
        if doc:
            documented.append(openapi.Operation(path, route.method, route.dialect, route.request,
                                                route.response, openapi.error_model(route)))

    for route in ROUTES:
        operation = route.bind(core)
        for i, path in enumerate(route.paths):
            add(path, route, operation, doc=i == 0)
    for path, route in TEI_ROUTES.items():  # the bare /tei/{model} last: it matches the rest
        add(path, route, route.bind(core), doc=True)

    async def runsync(request: Request) -> Response:
        """RunPod's Standard flavour, locally: the job's output wrapped as RunPod wraps it."""
        body = await _json_body(request)
        if not isinstance(body, dict) or "input" not in body:
            raise BadRequest('expected a JSON object {"input": {...}}', param="input")
        job_id = f"sync-{uuid.uuid4()}"
        result = await run_job(core, body["input"], job_id)
        return Response(dumps(runsync_response(job_id, result.output, result.error)),
                        media_type=JSON)

    routes.append(StarletteRoute("/runsync", runsync, methods=["POST"]))
    # caller mistakes inside `input` come back as a FAILED job (200); the body itself can be a 4xx
    documented.append(openapi.Operation("/runsync", "POST", "runpod", RunSyncRequest,
                                        RunSyncResponse, ErrorResponse, (400, 401, 413, 503)))

    spec: dict[str, Any] = {}

    async def openapi_json(_request: Request) -> Response:
        if not spec:  # made once, at its first request: no start-up cost
            spec.update(openapi.document(documented, TITLE, SUMMARY, version(DISTRIBUTION)))
        return Response(dumps(spec), media_type=JSON)

    routes.append(StarletteRoute("/v1/openapi.json", openapi_json, methods=["GET"]))
    routes.extend(pages.routes())  # /docs and the playground: after every API route

    async def unknown_route(request: Request) -> Response:
        # Last route of the mounted app: BentoML's own routes match first, everything else
        # gets the envelope (405 where the path exists with another method).
        scope = {**request.scope, "method": "*"}
        allowed = sorted({
            method for r in routes[:-1] if r.matches(scope)[0].value
            for method in (getattr(r, "methods", None) or ())
        })
        if allowed:
            raise StarletteHTTPException(405, headers={"Allow": ", ".join(allowed)})
        raise StarletteHTTPException(404)

    routes.append(StarletteRoute("/{path:path}", unknown_route,
                                 methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc, request.url.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {path}"), path)
        if exc.status_code == 405:
            error = MethodNotAllowed(f"method {request.method} is not allowed on {path}")
            error.headers = dict(exc.headers or {})  # Allow
            return error_response(error, path)
        return error_response(InternalError(f"internal error: HTTP {exc.status_code} {exc.detail}"),
                              path)

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError(f"internal error: {type(exc).__name__}"),
                              request.url.path)

    return Starlette(routes=routes, exception_handlers={
        APIError: api_error, StarletteHTTPException: http_error, Exception: unexpected})
