"""ASGI middleware around the whole BentoML app (OpenAI routes, /batch/*, docs, metrics):
API-key auth, the request-body cap, and one log line per request.

Added with `Service.add_asgi_middleware`, so it also guards BentoML's own routes, which the mounted
OpenAI app never sees.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from ..config import Settings
from ..core.encoding import dumps
from ..core.errors import APIError, NotFound, PayloadTooLarge, Unauthorized
from .pages import is_page
from .routes import dialect_of
from ..observability.logs import request_log

logger = logging.getLogger("embedding_worker")
Scope = dict[str, Any]
PROBES = ("/livez", "/healthz", "/readyz")


class RequestGuard:
    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.keys = [key.encode() for key in settings.api_keys]
        self.max_bytes = settings.max_request_bytes
        self.log_requests = settings.log_requests
        self.open_paths = PROBES if settings.metrics_require_auth else (*PROBES, "/metrics")
        self.quiet_paths = (*PROBES, "/metrics")  # no log line for probes and scrapes
        self.public_pages = settings.public_pages

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        if path not in self.quiet_paths:
            logger.debug("request started %s %s", scope["method"], path)
        logged = self.log_requests and path not in self.quiet_paths
        with request_log(scope["method"], path, logged) as record:
            response_started = False

            async def send_tracking(message: dict[str, Any]) -> None:
                nonlocal response_started
                if message["type"] == "http.response.start":
                    response_started = True
                    record.status = message["status"]
                await send(message)

            try:
                if self.keys and path not in self.open_paths and not self._authorized(scope) \
                        and not (self.public_pages and is_page(scope["method"], path)):
                    raise Unauthorized(
                        "missing or invalid API key; send the header `Authorization: Bearer <key>`"
                    )
                if any(ord(char) < 32 for char in path):
                    # no route matches a control character (routers' patterns stop at a newline),
                    # and BentoML's own 404 would be plain text
                    raise NotFound(f"no route {scope['method']} {path!r}")
                declared = _content_length(scope)
                if declared is not None and declared > self.max_bytes:
                    raise self._too_large(declared)
                if declared is None and _header(scope, b"transfer-encoding") is not None:
                    receive = await self._buffered(receive)  # chunked: count before the app reads
                await self.app(scope, receive, send_tracking)
            except APIError as exc:
                if response_started:
                    raise
                await _send_error(send_tracking, exc, path)

    async def _buffered(self, receive: Any) -> Any:
        """Read a body of unknown length under the cap, then replay it to the app."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                raise self._too_large(size, at_least=True)
            if not message.get("more_body", False):
                break

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        return replay

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization")
        scheme, _, token = (header or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        if not token:
            return False
        ok = False
        for key in self.keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(key, token)
        return ok

    def _too_large(self, size: int, at_least: bool = False) -> PayloadTooLarge:
        more = "more than " if at_least else ""
        return PayloadTooLarge(
            f"request body is {more}{size} bytes, at most {self.max_bytes} (MAX_REQUEST_BYTES)"
        )


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _send_error(send: Any, error: APIError, path: str) -> None:
    body = dumps(error.tei_envelope() if dialect_of(path) == "tei" else error.envelope())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
