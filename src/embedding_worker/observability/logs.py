"""Logging for the service's own lines (BentoML configures only its own loggers)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from ..config import Settings

LOGGER_NAME = "embedding_worker"


def configure_logging(settings: Settings) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(settings.log_level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [embedding_worker] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    # Per-request access lines cost CPU that the model needs on small machines (each goes through
    # the Rich handler infinity installs); the access log is off unless LOG_LEVEL=DEBUG.
    if settings.log_level != "DEBUG":
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return logger


@dataclass
class RequestRecord:
    """One request's facts for its log line; the core fills in what only it knows."""

    method: str
    route: str
    model: str | None = None
    items: int | None = None
    tokens: int | None = None
    status: int = 0
    latency_ms: float = 0.0
    outcome: str | None = None  # set when the request ended other than by a response


_record: ContextVar[RequestRecord | None] = ContextVar("request_record", default=None)


@contextmanager
def request_log(method: str, route: str, enabled: bool = True) -> Iterator[RequestRecord]:
    """The current request's record, timed and logged as one line when the request ends (both
    transports); the transport sets `status`, the core fills in model, items and tokens."""
    record = RequestRecord(method, route)
    _record.set(record)
    started = time.perf_counter()
    try:
        yield record
    finally:
        record.latency_ms = round((time.perf_counter() - started) * 1000, 2)
        if enabled:
            log_request(record)


def one_line(exc: BaseException) -> str:
    """An exception as one log line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def annotate(**facts: Any) -> None:
    """Add facts (model, items, tokens) to the current request's line, if there is one."""
    record = _record.get()
    if record is not None:
        for key, value in facts.items():
            setattr(record, key, value)


def log_request(record: RequestRecord) -> None:
    """One structured line per request: no payloads, no credentials."""
    line = {k: v for k, v in asdict(record).items() if v is not None}
    logging.getLogger(LOGGER_NAME).info("request %s", orjson.dumps(line).decode())
