"""The one request pipeline every endpoint family runs on.

A family's operation reads: parse the body (`parse`), look the model up (`Models.require`),
validate every item before any work starts (`check_sizes`, the family's own checks), then inside
`admit` (admission, deadline, accounting, the request's log annotations) compute through
`compute` (the model's heartbeat, cancellation) and build the response from `schemas`.
Cancellation needs no convention: a transport cancels the task when its caller leaves, and
`compute` tells that from an expired deadline by the deadline itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..config import Settings
from ..engine.base import Fault, ModelBackend, is_fault
from ..observability import metrics
from ..observability.logs import annotate
from .errors import (
    APIError,
    BadRequest,
    DeadlineExceeded,
    ModelFault,
    Overloaded,
    PayloadTooLarge,
    from_validation_error,
)
from .schemas import type_name

M = TypeVar("M", bound=BaseModel)

# Requests up to this many characters count their tokens on the event loop (~20 µs per short
# text): cheaper than a hop to a thread.
INLINE_TOKENIZE_CHARS = 2000


def parse(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type_name(body)}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


class Served:
    """One admitted request: its deadline, and the tokens it used (for metrics and the log)."""

    __slots__ = ("deadline", "tokens")

    def __init__(self, deadline: asyncio.Timeout | None = None):
        self.deadline = deadline
        self.tokens = 0


class Pipeline:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.in_flight = 0  # admitted requests being served (MAX_CONCURRENT_REQUESTS)
        self.queued: dict[str, int] = defaultdict(int)  # admitted, unfinished items per model

    # --- validate ---

    def check_sizes(self, field: str, texts: Sequence[str],
                    positions: Sequence[int] | None = None) -> None:
        """Every text within MAX_TEXT_CHARS (`positions`: each text's index in the request)."""
        limit = self.settings.max_text_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                where = positions[i] if positions is not None else i
                raise PayloadTooLarge(
                    f"{field}[{where}]: {len(text)} characters, at most {limit} per text "
                    f"(MAX_TEXT_CHARS)", param=field,
                )

    async def check_window(self, model: ModelBackend, field: str, texts: list[str],
                           query: str | None = None, why: str = "TRUNCATE_INPUTS=false",
                           limit: tuple[int, str] | None = None,
                           positions: Sequence[int] | None = None) -> None:
        """Refuse texts the model would have to truncate (`why` names what asked for that);
        `limit`: a token limit below the window, and the field that set it."""
        window = model.info.window
        if window is None:
            return
        bound = f"the model's window of {window} tokens"
        if limit is not None and limit[0] < window:
            window, bound = limit[0], f"{limit[1]}={limit[0]}"
        counts = await asyncio.to_thread(model.count_tokens, texts, query)
        for i, count in enumerate(counts or []):
            if count > window:
                what = "query and document together are" if query is not None else "it is"
                where = positions[i] if positions is not None else i
                raise BadRequest(
                    f"{field}[{where}]: {what} {count} tokens, over {bound} "
                    f"({why} refuses instead of truncating)",
                    param=field, code="context_length_exceeded",
                )

    # --- admit, with deadline and accounting ---

    @asynccontextmanager
    async def admit(self, operation: str, model: ModelBackend, items: int) -> AsyncIterator[Served]:
        name = model.info.name
        annotate(model=name, items=items)
        limit = self.settings.max_concurrent_requests
        if self.in_flight >= limit:
            metrics.rejected(name, "concurrency")
            raise Overloaded(
                f"the server is at its limit of {limit} concurrent requests "
                f"(MAX_CONCURRENT_REQUESTS); retry shortly"
            )
        queued = self.queued[name]
        # a request larger than the whole bound is still served when nothing else waits
        if queued and queued + items > self.settings.infinity_queue_size:
            metrics.rejected(name, "queue")
            raise Overloaded(
                f"model {name!r} has {queued} items waiting and this request adds {items}, over "
                f"INFINITY_QUEUE_SIZE={self.settings.infinity_queue_size}; retry shortly"
            )
        outcome, start = "error", time.perf_counter()
        self.in_flight += 1
        self.queued[name] += items
        served = Served()
        try:
            async with asyncio.timeout(self.settings.request_timeout) as served.deadline:
                yield served
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
            raise DeadlineExceeded(
                f"the request did not finish within {self.settings.request_timeout:g}s "
                f"(REQUEST_TIMEOUT) and was cancelled"
            ) from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except APIError as exc:
            outcome = "client_error" if exc.status < 500 else "error"
            raise
        finally:
            self.in_flight -= 1
            self.queued[name] -= items
            metrics.queue_depth(name, model.queue().queue_absolute)
            metrics.request(operation, name, outcome, time.perf_counter() - start,
                            items if outcome == "ok" else 0, served.tokens)
            annotate(tokens=served.tokens or None)

    # --- compute ---

    async def compute(self, model: ModelBackend, call: Awaitable[Any],
                      served: Served | None = None) -> Any:
        """Await an engine call, telling the model's heartbeat (stall detection) about it. A
        cancellation that is not the request's deadline means the caller left: the engine skips
        its queued items, which is no evidence of a stall."""
        model.heartbeat.submitted()
        abandoned = False
        try:
            return await call
        except asyncio.CancelledError:
            deadline = served.deadline if served is not None else None
            abandoned = deadline is None or not deadline.expired()
            raise
        finally:
            model.heartbeat.finished(abandoned=abandoned)

    async def batched(self, model: ModelBackend, rows: Awaitable[list[Any]],
                      texts: list[str]) -> tuple[list[Any], int]:
        """`rows` (the model's batcher's, or the cache's, results for this request's inputs) and
        the request's own usage, counted beside them (the batcher mixes requests, so the
        engine's count per call is not this request's)."""
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            return await rows, model.usage(texts)
        found, tokens = await asyncio.gather(rows, asyncio.to_thread(model.usage, texts))
        return found, tokens

    @staticmethod
    def raise_faults(model: ModelBackend, field: str, results: Sequence[Any]) -> None:
        """A model fault on some items fails this request, and only this one."""
        for i, value in enumerate(results):
            if is_fault(value):
                # scores lose the Fault type in arithmetic; the model kept the reason
                reason = value.error if isinstance(value, Fault) else model.last_fault
                raise ModelFault(f"model {model.info.name!r} failed on {field}[{i}]: {reason}",
                                 param=field)


async def per_model(items: Sequence[Any], run: Callable[[str, list[int]], Awaitable[None]]) -> None:
    """Run `run(model, positions)` for each model named by `items` (BentoML batches mix them)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.model].append(i)
    await asyncio.gather(*(run(model, positions) for model, positions in groups.items()))
