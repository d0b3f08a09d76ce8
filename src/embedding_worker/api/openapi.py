"""The OpenAPI document of the HTTP surface (`/v1/openapi.json`), made from the route table on
its first request: request bodies in pydantic's validation mode, responses in its serialisation
mode, each route's error statuses in its dialect's error shape.

The app is plain Starlette (BentoML imports it anyway); FastAPI, whose import and route set-up
cost ~0.25 s of a 1.7 s start, was used only to write this document (docs/performance.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from ..core.dialects.tei import TeiError
from ..core.schemas import ErrorResponse
from .routes import Route

JSON = "application/json"
REF = "#/components/schemas/{model}"

ERRORS = {
    400: "invalid request",
    401: "missing or invalid API key (when API_KEY is set)",
    404: "unknown model",
    413: "request body, item count or text length over its limit",
    429: "overloaded; retry after the Retry-After header's seconds",
    500: "the model failed on this request's items",
    503: "not ready",
    504: "deadline (REQUEST_TIMEOUT) exceeded",
}


SECURITY = {"bearer": {"type": "http", "scheme": "bearer",
                       "description": "one of API_KEY's keys, when the server has API_KEY"}}


def error_model(route: Route) -> Any:
    """TEI's routes answer errors in TEI's shape; `/rerank` in either (the body decides)."""
    if route.dialect == "tei":
        return TeiError
    return ErrorResponse | TeiError if route.paths == ("/rerank",) else ErrorResponse


@dataclass(frozen=True)
class Operation:
    """One documented path (Starlette's form: `{model:path}`) and what it takes and answers."""

    path: str
    method: str
    tag: str
    request: Any  # None for a GET
    response: Any
    errors: Any
    statuses: tuple[int, ...] = tuple(ERRORS)


def document(operations: list[Operation], title: str, summary: str, version: str) -> dict:
    wanted: dict[tuple[Any, str], None] = {}  # (type, mode), in order, once each
    for op in operations:
        if op.request is not None:
            wanted[(op.request, "validation")] = None
        wanted[(op.response, "serialization")] = None
        wanted[(op.errors, "serialization")] = None
    schemas, definitions = TypeAdapter.json_schemas(
        [(type_, mode, TypeAdapter(type_)) for type_, mode in wanted], ref_template=REF)

    def content(type_: Any, mode: str) -> dict:
        return {JSON: {"schema": schemas[(type_, mode)]}}

    paths: dict[str, dict] = {}
    for op in operations:
        path = re.sub(r"{(\w+):\w+}", r"{\1}", op.path)
        entry: dict[str, Any] = {
            "tags": [op.tag],
            "operationId": op.method.lower() + re.sub(r"\W", "_", path),
            "responses": {
                "200": {"description": "Successful Response",
                        "content": content(op.response, "serialization")},
                **{str(status): {"description": ERRORS[status],
                                 "content": content(op.errors, "serialization")}
                   for status in op.statuses},
            },
        }
        if op.request is not None:
            entry["requestBody"] = {"required": True,
                                    "content": content(op.request, "validation")}
        if "{model}" in path:
            entry["parameters"] = [{"name": "model", "in": "path", "required": True,
                                    "description": "a served model's name (may contain /)",
                                    "schema": {"type": "string"}}]
        paths.setdefault(path, {})[op.method.lower()] = entry
    return {"openapi": "3.1.0", "info": {"title": title, "summary": summary, "version": version},
            "paths": paths, "components": {"schemas": definitions.get("$defs", {}),
                                           "securitySchemes": SECURITY},
            # {}: no key needed (a server without API_KEY); else the bearer key
            "security": [{}, {"bearer": []}]}
