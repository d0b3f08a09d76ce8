"""Repeated texts from memory: a bounded LRU of embeddings per process.

Retrieval traffic repeats itself (popular queries, documents indexed again). The key is the
model and the exact text the engine gets: the prompt and any truncation cut are already in it,
and an END cut at the window is the engine's, the same each time. What a request derives from
the vector (normalisation, `dimensions`, output types, encodings) comes after, so one entry
serves them all. Identical texts in flight at once are computed once: a second request waits
for the first one's row. Faults are never kept. Sized in bytes (EMBEDDING_CACHE_MB), evicting
the least recently used; off for a model with EMBEDDING_CACHE=off in its place.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from ..engine.base import is_fault
from ..observability import metrics

Compute = Callable[[list[str]], Awaitable[list[Any]]]
_ENTRY_OVERHEAD = 200  # bytes per entry beyond the text and the vector: key tuple, dict slot


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def rows(self, model: str, texts: Sequence[str], compute: Compute,
                   *, counted: bool = True) -> list[Any]:
        """Each text's row: from memory, from a request computing it already, or from
        `compute` (called once with the texts nobody has, each once; again only for texts
        whose computing request left). Each text is counted in the metrics once: `counted`
        is False for that second lookup."""
        out: list[Any] = [None] * len(texts)
        mine: dict[str, list[int]] = {}  # texts this call computes -> their positions
        waiting: list[tuple[int, asyncio.Future]] = []
        hits = 0
        for i, text in enumerate(texts):
            key = (model, text)
            row = self._entries.get(key)
            if row is not None:
                self._entries.move_to_end(key)
                out[i] = row
                hits += 1
            elif text in mine:
                mine[text].append(i)
            elif key in self._pending:
                waiting.append((i, self._pending[key]))
            else:
                mine[text] = [i]
        if counted:
            metrics.cache(model, hits, len(waiting), len(mine))
        if mine:
            await self._compute(model, mine, out, compute)
        orphans: list[int] = []
        for i, future in waiting:
            try:
                out[i] = await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.cancelled():  # this request is the one cancelled
                    raise
                orphans.append(i)  # the request computing it left or failed
        if orphans:
            # Computed here after all: in one call, and through the cache again so that the
            # other requests orphaned with this one share it rather than each computing it.
            rows = await self.rows(model, [texts[i] for i in orphans], compute, counted=False)
            for i, row in zip(orphans, rows):
                out[i] = row
        return out

    async def _compute(self, model: str, mine: dict[str, list[int]], out: list[Any],
                       compute: Compute) -> None:
        loop = asyncio.get_running_loop()
        futures = {text: loop.create_future() for text in mine}
        for text, future in futures.items():
            self._pending[(model, text)] = future
        try:
            rows = await compute(list(mine))
        except BaseException:
            for future in futures.values():
                future.cancel()  # whoever waits on these computes them itself
            raise
        finally:
            for text in mine:
                self._pending.pop((model, text), None)
        for (text, positions), row in zip(mine.items(), rows):
            for i in positions:
                out[i] = row
            futures[text].set_result(row)
            if not is_fault(row):
                self._put((model, text), row)

    def _put(self, key: tuple[str, str], row: Any) -> None:
        vector = np.array(row, dtype=np.float32)  # a copy: the batch's array is not kept alive
        size = vector.nbytes + sys.getsizeof(key[1]) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes + sys.getsizeof(key[1]) + _ENTRY_OVERHEAD
        self._entries[key] = vector
        self.bytes += size
        while self.bytes > self.max_bytes:
            (_, text), evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes + sys.getsizeof(text) + _ENTRY_OVERHEAD
