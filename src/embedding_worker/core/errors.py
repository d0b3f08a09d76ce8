"""Every error a client can see, built in one place.

The core raises `APIError`s; HTTP turns them into a status and the OpenAI envelope (TEI's on
TEI's routes), RunPod into a failed job carrying `message`. Both transports therefore show the same text.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None
    headers: dict[str, str] = {}  # extra HTTP headers (e.g. Retry-After)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    shape: str | None = None  # the dialect whose error body it gets, if not the route's

    def tei_envelope(self) -> dict[str, Any]:
        """text-embeddings-inference's error body, which huggingface_hub reads (`error`)."""
        kind = {401: "Unauthorized", 429: "Overloaded", 503: "Unhealthy"}.get(
            self.status, "Validation" if self.status < 500 else "Backend")
        return {"error": self.message, "error_type": kind}

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


def too_many(field: str, count: int, limit: int, setting: str, noun: str = "items") -> PayloadTooLarge:
    """413 for a list over its configured limit, naming the setting that raises it."""
    return PayloadTooLarge(
        f"{field}: {count} {noun}, at most {limit} per request ({setting})", param=field
    )


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class Unavailable(APIError):
    status = 503
    type = "service_unavailable"
    code = "not_ready"


class DeadlineExceeded(APIError):
    status = 504
    type = "timeout_error"
    code = "request_timeout"


class InternalError(APIError):
    status = 500
    type = "internal_error"


class ModelFault(InternalError):
    """The model raised on this request's items (other requests are unaffected)."""

    code = "model_error"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: ValidationError) -> BadRequest:
    """The first pydantic error as `field[index]: what was wrong`."""
    first = exc.errors(include_url=False)[0]
    where = _loc(tuple(p for p in first["loc"] if p not in ("function-after", "function-before")))
    message = first["msg"]
    if first["type"] == "missing":
        message = "field required"
    elif first["type"] in ("extra_forbidden",):
        message = "unknown field"
    # Our own validators already name the item (`input[3]: ...`); pydantic's messages do not.
    text = message if first["type"] == "invalid_input" or not where else f"{where}: {message}"
    param = where.split("[")[0].split(".")[0] or None
    if first["type"] == "invalid_input" and param:
        # Our validators name the field; the client may have sent it by another name (`docs`,
        # `embedding_type`): the message names what the client sent.
        text = re.sub(r"^\w+(?=[\[.:])", param, text, count=1)
    return BadRequest(text, param=param)
