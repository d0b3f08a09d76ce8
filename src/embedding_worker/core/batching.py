"""Length batching: the one stage where inputs wait, and how the engine's batches are formed.

The chain, from a request to the model (docs/architecture.md draws it):
1. Here: each model has one `LengthBatcher` per kind of input (texts to embed, (query, document)
   pairs to score). Inputs of every request wait in it while engine calls run. The next call takes
   the oldest waiting input (so nothing starves) and those closest to it in length, as many as pad
   little, at most the model's batch size (BATCH_SIZES). An idle engine is called at once, so a
   lone request pays nothing; a busy one gets at most `MAX_IN_FLIGHT` calls.
2. infinity's own queue then receives each call whole and runs it as one batch of its three model
   threads (tokenise, forward, post-process); `INFINITY_QUEUE_SIZE` bounds what waits there.
3. On a CPU, `engine.grouping` runs each batch's forward pass in length-sorted groups of at most
   `GROUP_TOKENS` padded tokens (wide batches gain a CPU nothing); a GPU gets the batch whole.

Why: infinity alone commits arriving items to batches early (several batches ahead of the model),
each from whatever arrived meanwhile. With concurrent requests of mixed lengths, short texts then
ride in batches padded to the longest passage, and on a CPU the model's cost is per padded token:
half the throughput or less (docs/performance.md). Lengths here are characters, a cheap stand-in
for tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from itertools import accumulate
from typing import Any

from ..engine.base import ModelBackend

EngineCall = Callable[[list[Any]], Awaitable[tuple[list[Any], int]]]

# Engine calls in flight per batcher: one computing, one being tokenised behind it.
MAX_IN_FLIGHT = 2
# Past the model's window every input is truncated to the same cost, so lengths are capped at
# this many characters per window token, generous enough that no input within the window reaches
# it (prose runs 4-5 characters a token, the benchmark's random words ~8): overlong inputs of any
# length then share batches.
CHARS_PER_TOKEN = 10

# How many batches' worth of the oldest waiting texts a batch is chosen from: wider windows pad
# less but sort more on the event loop, and spread a large request over more batches (its p50
# grows: 64-text requests at c=16 had 1.7x Infinity's p50 at equal throughput; 2 batches cut
# that but cost 13-15 % of throughput in an A/B).
_WINDOW_BATCHES = 16
# A batch's padding (characters, summed over its texts) may be at most this fraction of its padded
# length, or `_PADDING_SLACK` characters, whichever is more: a smaller batch of similar lengths
# beats a full one where a single passage pads thirty short queries to its length. On a CPU the
# model's cost is per padded token and flat in batch size past a few passages, so the bound is
# tight (at 0.3, batches carried 33 % padded tokens and requests of 1-8 texts lost 15-20 % of
# throughput: docs/performance.md); the slack keeps short texts together, as padding them costs
# less than one more engine call (~6.5 ms on this CPU, ~50 tokens' worth).
_MAX_PADDING = 0.1
_PADDING_SLACK = 256


class _Request:
    __slots__ = ("rows", "remaining", "future")

    def __init__(self, size: int, future: asyncio.Future):
        self.rows: list[Any] = [None] * size
        self.remaining = size
        self.future = future


class _Item:
    __slots__ = ("value", "length", "request", "index")

    def __init__(self, value: Any, length: int, request: _Request, index: int):
        self.value = value
        self.length = length
        self.request = request
        self.index = index


def pair_length(pair: tuple[str, str]) -> int:
    return len(pair[0]) + len(pair[1])


class PerModel:
    """One `LengthBatcher` per model for one kind of input: `call` picks the model's engine call
    (`ModelBackend.embed`, `.score`), `length` measures an input."""

    def __init__(self, call: Callable[[ModelBackend], EngineCall], length: Callable[[Any], int]):
        self._call = call
        self._length = length
        self._batchers: dict[str, LengthBatcher] = {}

    def __call__(self, model: ModelBackend) -> LengthBatcher:
        batcher = self._batchers.get(model.info.name)
        if batcher is None:
            batcher = self._batchers[model.info.name] = LengthBatcher.for_model(
                self._call(model), self._length, model.info.batch_size, model.info.window)
        return batcher


class LengthBatcher:
    @classmethod
    def for_model(cls, call: EngineCall, length: Callable[[Any], int], batch_size: int,
                  window: int | None) -> LengthBatcher:
        """A model's batcher: lengths capped at the window (see `CHARS_PER_TOKEN`)."""
        if window is not None:
            cap, measure = window * CHARS_PER_TOKEN, length
            length = lambda value: min(measure(value), cap)  # noqa: E731
        return cls(call, length=length, max_in_flight=MAX_IN_FLIGHT, max_items=batch_size)

    def __init__(self, call: EngineCall, *, max_in_flight: int, max_items: int,
                 length: Callable[[Any], int] = len):
        self._call = call
        self._length = length  # characters: a cheap stand-in for tokens
        self.max_in_flight = max_in_flight
        self.max_items = max_items  # inputs per engine call
        self.in_flight = 0
        self._waiting: list[_Item] = []  # arrival order

    async def submit(self, inputs: list[Any]) -> list[Any]:
        """The engine's results for `inputs`, in order. Cancelling the caller withdraws its inputs
        not yet sent, and cancels an engine call once none of the callers it serves is left."""
        if not inputs:
            return []
        if not self.in_flight and not self._waiting and len(inputs) <= self.max_items:
            return await self._alone(inputs)
        request = _Request(len(inputs), asyncio.get_running_loop().create_future())
        length = self._length
        self._waiting.extend(_Item(value, length(value), request, i) for i, value in enumerate(inputs))
        self._dispatch()
        return await request.future

    async def _alone(self, inputs: list[Any]) -> list[Any]:
        """An idle engine and a request that fits one batch: call it from the caller's own task
        (two tasks fewer than a shared call; cancelling the caller cancels the call)."""
        self.in_flight += 1
        try:
            rows, _ = await self._call(inputs)
            return rows
        finally:
            self.in_flight -= 1
            self._dispatch()

    def _dispatch(self) -> None:
        """An idle engine gets the next batch at once. A busy one gets a second call queued behind
        the running one (its tokenisation overlaps the compute) only when a batch's worth waits:
        otherwise the texts arriving meanwhile would be sent in ones and twos."""
        while self._waiting and (not self.in_flight or (
                self.in_flight < self.max_in_flight and len(self._waiting) >= self.max_items)):
            batch = self._take()
            if not batch:
                return
            self.in_flight += 1
            asyncio.ensure_future(self._run(batch))

    def _take(self) -> list[_Item]:
        """The next batch: the oldest waiting text and, from a window of the oldest ones sorted by
        length, as many of its neighbours in length (up to `max_items`) as keep the padding
        within `_MAX_PADDING` of the batch's compute."""
        n = self.max_items
        window: list[_Item] = []
        scanned = 0
        for item in self._waiting:
            scanned += 1
            if not item.request.future.done():  # its caller has not gone away
                window.append(item)
                if len(window) == n * _WINDOW_BATCHES:
                    break
        rest = self._waiting[scanned:]
        if not window:
            self._waiting = rest
            return []
        oldest = window[0]
        by_length = sorted(window, key=lambda item: item.length)
        lengths = [item.length for item in by_length]
        total = [0, *accumulate(lengths)]
        at = next(i for i, item in enumerate(by_length) if item is oldest)
        best = (1, 0, at)  # (size, -padding, start)
        for end in range(at + 1, min(at + n, len(by_length)) + 1):
            longest = lengths[end - 1]
            # the most texts ending at `end` whose padding stays within bounds
            for start in range(max(0, end - n), at + 1):
                size, used = end - start, total[end] - total[start]
                if size * longest - used <= max(_MAX_PADDING * size * longest, _PADDING_SLACK):
                    best = max(best, (size, used - size * longest, start))
                    break
        size, _, start = best
        batch = by_length[start:start + size]
        chosen = {id(item) for item in batch}
        self._waiting = [item for item in window if id(item) not in chosen] + rest
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        requests = list({id(item.request): item.request for item in batch}.values())
        call = asyncio.ensure_future(self._call([item.value for item in batch]))

        def withdrawn(_: asyncio.Future) -> None:
            if all(request.future.done() for request in requests) and not call.done():
                call.cancel()  # nobody is left to read it: stop the engine work

        for request in requests:
            request.future.add_done_callback(withdrawn)
        try:
            rows, _ = await call
        except BaseException as exc:  # noqa: BLE001 - handed to every caller in the batch
            for request in requests:
                if not request.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        request.future.cancel()
                    else:
                        request.future.set_exception(exc)
        else:
            for item, row in zip(batch, rows):
                request = item.request
                if request.future.done():
                    continue
                request.rows[item.index] = row
                request.remaining -= 1
                if not request.remaining:
                    request.future.set_result(request.rows)
        finally:
            for request in requests:
                request.future.remove_done_callback(withdrawn)
            self.in_flight -= 1
            self._dispatch()
