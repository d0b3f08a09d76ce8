"""The service's tracing settings for BentoML."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def tracing_config() -> dict:
    """BentoML's OpenTelemetry middleware makes a span per request (~0.5 ms of a short request's
    latency here, docs/performance.md) that only an exporter makes useful. Without one configured,
    trace no URL. With one, pass the top-level `tracing` settings on: BentoML 1.4 replaces them
    with the service's own (unset) ones, so `tracing.*` options would export nothing."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    def exporters(node: object) -> Iterator[Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "exporter_type" and value:
                    yield value
                yield from exporters(value)

    def given(node: dict) -> dict:
        kept = {k: given(v) if isinstance(v, dict) else v for k, v in node.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}

    config = BentoMLContainer.config.get()
    if not any(exporters(config)):
        return {"excluded_urls": ".*"}
    return given(config.get("tracing") or {})
