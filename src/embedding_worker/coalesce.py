"""Merge concurrent embedding calls for one model into fewer, larger engine calls.

infinity hands each arriving item to its model pipeline at once, so small concurrent requests run
as batches of one or two; on a CPU a batch of 16 short texts costs twice a batch of one (about 8x
the throughput). Here, while `max_in_flight` engine calls are running, new calls wait and are then
sent together as one call, and split back per caller. An idle engine is called immediately, so a
lone request pays nothing. Measured in docs/performance.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

EngineCall = Callable[[list[str]], Awaitable[tuple[list[Any], int]]]


class _Waiter:
    __slots__ = ("texts", "future")

    def __init__(self, texts: list[str], future: asyncio.Future):
        self.texts = texts
        self.future = future


class Coalescer:
    def __init__(self, call: EngineCall, *, max_in_flight: int, max_items: int):
        self._call = call
        self.max_in_flight = max_in_flight
        self.max_items = max_items  # items per merged call (a lone larger request still goes)
        self.in_flight = 0
        self._waiting: list[_Waiter] = []

    async def embed(self, texts: list[str]) -> list[Any]:
        """Rows for `texts`, in order. Cancelling the caller withdraws its texts if they have not
        been sent yet, and cancels the engine call if no other caller shares it."""
        if self.in_flight < self.max_in_flight and not self._waiting:
            return await self._alone(texts)
        waiter = _Waiter(texts, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        return await waiter.future

    async def _alone(self, texts: list[str]) -> list[Any]:
        self.in_flight += 1
        try:
            rows, _ = await self._call(texts)
            return rows
        finally:
            self.in_flight -= 1
            self._next()

    def _next(self) -> None:
        """Send everything waiting (up to max_items) as one call, if a slot is free."""
        while self._waiting and self.in_flight < self.max_in_flight:
            batch, size = [], 0
            while self._waiting and (not batch or size + len(self._waiting[0].texts) <= self.max_items):
                waiter = self._waiting.pop(0)
                if not waiter.future.done():  # its caller went away before it was sent
                    batch.append(waiter)
                    size += len(waiter.texts)
            if batch:
                self.in_flight += 1
                asyncio.ensure_future(self._merged(batch))

    async def _merged(self, batch: list[_Waiter]) -> None:
        texts = [t for waiter in batch for t in waiter.texts]
        call = asyncio.ensure_future(self._call(texts))

        def withdrawn(_: asyncio.Future) -> None:
            if all(w.future.cancelled() for w in batch) and not call.done():
                call.cancel()  # nobody is left to read it: stop the engine work

        for waiter in batch:
            waiter.future.add_done_callback(withdrawn)
        try:
            rows, _ = await call
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the merged call
            for waiter in batch:
                if not waiter.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        waiter.future.cancel()
                    else:
                        waiter.future.set_exception(exc)
        else:
            start = 0
            for waiter in batch:
                end = start + len(waiter.texts)
                if not waiter.future.done():
                    waiter.future.set_result(rows[start:end])
                start = end
        finally:
            self.in_flight -= 1
            self._next()
