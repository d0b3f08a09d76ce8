"""The HTTP surface of every dialect (`routes.ROUTES`): read the body, call the core, serialise.
No logic of its own.

Mounted into the BentoML service with `@bentoml.asgi_app`; built over the process's `Core`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.core import Core
from ..core.encoding import dumps
from ..core.dialects.tei import TeiError
from ..core.errors import APIError, BadRequest, InternalError, MethodNotAllowed, NotFound
from ..core.schemas import ErrorResponse, RunSyncRequest, RunSyncResponse, runsync_response
from ..observability.logs import annotate
from .jobs import run_job
from .routes import ROUTES, TEI_ROUTES, Operation, Route, dialect_of

logger = logging.getLogger("embedding_worker")

JSON = "application/json"


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
        task = asyncio.ensure_future(handler(request, await _json_body(request)))

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


def _body_doc(model: type) -> dict[str, Any]:
    """OpenAPI request body for routes that read the raw body themselves."""
    return {
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "invalid request",
        401: "missing or invalid API key (when API_KEY is set)",
        404: "unknown model",
        413: "request body, item count or text length over its limit",
        429: "overloaded; retry after the Retry-After header's seconds",
        500: "the model failed on this request's items",
        501: "modality not implemented",
        503: "not ready",
        504: "deadline (REQUEST_TIMEOUT) exceeded",
    }.items()
}


# TEI's routes answer errors in TEI's shape; `/rerank` in either (the body decides)
_TEI_ERRORS = {status: {**doc, "model": TeiError} for status, doc in _ERRORS.items()}
_EITHER_ERRORS = {status: {**doc, "model": ErrorResponse | TeiError}
                  for status, doc in _ERRORS.items()}


def _errors_of(route: Route) -> dict[int, dict[str, Any]]:
    if route.dialect == "tei":
        return _TEI_ERRORS
    return _EITHER_ERRORS if route.paths == ("/rerank",) else _ERRORS


def create_app(core: Core) -> FastAPI:
    app = FastAPI(
        title="infinity-embedding-worker",
        summary="OpenAI-compatible embeddings and reranking over Infinity engines",
        docs_url=None,  # BentoML serves /docs for the whole service
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        path = request.url.path
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {path}"), path)
        if exc.status_code == 405:
            error = MethodNotAllowed(f"method {request.method} is not allowed on {path}")
            error.headers = dict(exc.headers or {})  # Allow
            return error_response(error, path)
        return error_response(InternalError(f"internal error: HTTP {exc.status_code} {exc.detail}"),
                              path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError(f"internal error: {type(exc).__name__}"),
                              request.url.path)

    def add(path: str, route: Route, operation: Operation, documented: bool) -> None:
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

        extra = _body_doc(route.request) if route.request is not None else {}
        if "{model" in path:
            extra["parameters"] = [{"name": "model", "in": "path", "required": True,
                                    "description": "a served model's name (may contain /)",
                                    "schema": {"type": "string"}}]
        app.add_api_route(path, endpoint, methods=[route.method], response_model=route.response,
                          responses=_errors_of(route), openapi_extra=extra or None,
                          include_in_schema=documented, name=path,
                          tags=[route.dialect])

    for route in ROUTES:
        operation = route.operation(core)
        for i, path in enumerate(route.paths):
            add(path, route, operation, documented=i == 0)
    for path, route in TEI_ROUTES.items():  # the bare /tei/{model} last: it matches the rest
        add(path, route, route.operation(core), documented=True)

    async def runsync(request: Request) -> Response:
        """RunPod's Standard flavour, locally: the job's output wrapped as RunPod wraps it."""
        body = await _json_body(request)
        if not isinstance(body, dict) or "input" not in body:
            raise BadRequest('expected a JSON object {"input": {...}}', param="input")
        job_id = f"sync-{uuid.uuid4()}"
        result = await run_job(core, body["input"], job_id)
        return Response(dumps(runsync_response(job_id, result.output, result.error)),
                        media_type=JSON)

    # caller mistakes inside `input` come back as a FAILED job (200); the body itself can be a 4xx
    app.add_api_route("/runsync", runsync, methods=["POST"], response_model=RunSyncResponse,
                      responses={s: _ERRORS[s] for s in (400, 401, 413, 503)},
                      openapi_extra=_body_doc(RunSyncRequest))

    async def unknown_route(request: Request) -> Response:
        # Last route of the mounted app: BentoML's own routes match first, everything else
        # gets the envelope (405 where the path exists with another method).
        scope = {**request.scope, "method": "*"}
        allowed = sorted({
            method for r in app.routes if r.path != "/{path:path}" and r.matches(scope)[0].value  # type: ignore[attr-defined]
            for method in (getattr(r, "methods", None) or ())
        })
        if allowed:
            raise StarletteHTTPException(405, headers={"Allow": ", ".join(allowed)})
        raise StarletteHTTPException(404)

    app.add_api_route("/{path:path}", unknown_route, include_in_schema=False,
                      methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    _register_schemas(app, [*dict.fromkeys(r.request for r in ROUTES if r.request is not None), RunSyncRequest])
    return app


def _register_schemas(app: FastAPI, models: list[type]) -> None:
    """Put the request models into the OpenAPI components referenced by `_body_doc`."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
