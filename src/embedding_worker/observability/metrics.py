"""Prometheus metrics beyond BentoML's defaults, served on BentoML's `/metrics`.

Created on first use, not at import: BentoML workers point prometheus_client at their
multi-process directory only after the service module is imported, and metrics created before
that would never reach `/metrics`. Created once per process (a second registration would fail).
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_metrics: dict[str, Any] = {}

PREFIX = "embedding_worker_"


def _get() -> dict[str, Any]:
    if _metrics:
        return _metrics
    with _lock:
        if not _metrics:
            from prometheus_client import Counter, Gauge, Histogram

            _metrics.update(
                requests=Counter(PREFIX + "requests", "Requests by operation, model and outcome",
                                 ["operation", "model", "outcome"]),
                items=Counter(PREFIX + "items", "Texts, images, clips or documents processed",
                              ["operation", "model"]),
                tokens=Counter(PREFIX + "tokens", "Tokens processed (as reported in usage)",
                               ["operation", "model"]),
                rejected=Counter(PREFIX + "rejected_requests",
                                 "Requests refused with 429 because of overload", ["model", "reason"]),
                image_failures=Counter(PREFIX + "image_fetch_failures",
                                       "Image inputs that could not be fetched or decoded", ["model"]),
                audio_failures=Counter(PREFIX + "audio_fetch_failures",
                                       "Audio inputs that could not be fetched or decoded", ["model"]),
                queue=Gauge(PREFIX + "queue_depth", "Items waiting in the model's queue", ["model"],
                            multiprocess_mode="livesum"),
                batch=Histogram(PREFIX + "batch_size", "Items per batch the model computed", ["model"],
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
                cache=Counter(PREFIX + "cache_lookups",
                              "Texts looked up in the embedding cache: hit, coalesced (computed "
                              "for another request in flight) or miss", ["model", "result"]),
                latency=Histogram(PREFIX + "request_seconds", "Time in the core per request",
                                  ["operation", "model"],
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)),
            )
    return _metrics


_children: dict[tuple[str, ...], Any] = {}


def _child(metric: str, *labels: str) -> Any:
    """`metric.labels(*labels)`, kept: prometheus_client checks and locks on every look-up, and a
    request makes several (together ~10-17 us of the event loop's time per request, measured)."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = _get()[metric].labels(*labels)
    return found


def request(operation: str, model: str, outcome: str, seconds: float, items: int = 0,
            tokens: int = 0) -> None:
    _child("requests", operation, model, outcome).inc()
    _child("latency", operation, model).observe(seconds)
    if items:
        _child("items", operation, model).inc(items)
    if tokens:
        _child("tokens", operation, model).inc(tokens)


def rejected(model: str, reason: str) -> None:
    _child("rejected", model, reason).inc()


def image_failure(model: str) -> None:
    _child("image_failures", model).inc()


def audio_failure(model: str) -> None:
    _child("audio_failures", model).inc()


def queue_depth(model: str, depth: int) -> None:
    _child("queue", model).set(depth)


def batch_size(model: str, size: int) -> None:
    _child("batch", model).observe(size)


def cache(model: str, hits: int, coalesced: int, misses: int) -> None:
    for result, count in (("hit", hits), ("coalesced", coalesced), ("miss", misses)):
        if count:
            _child("cache", model, result).inc(count)
