"""Closed-loop async load: N workers send back-to-back requests for a fixed time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Callable

import httpx
import numpy as np


@dataclass
class CellResult:
    requests: int = 0
    errors: int = 0
    items: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    server_cpu_s: float = 0.0  # the server's CPU time over the measured span
    client_cpu_s: float = 0.0  # this process's (the load generator shares the cores)
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        return {
            "requests": self.requests,
            "errors": self.errors,
            "items": self.items,
            "items_per_s": self.items / self.elapsed if self.elapsed else 0.0,
            "tokens_per_s": self.tokens / self.elapsed if self.elapsed else 0.0,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "elapsed_s": self.elapsed,
            "server_cpu_s": self.server_cpu_s,
            "client_cpu_s": self.client_cpu_s,
        }


async def run_cell(
    base_url: str,
    path: str,
    make_body: Callable[[int], tuple[dict, int, int]],
    concurrency: int,
    duration: float,
    warmup: float = 1.0,
    server_cpu: Callable[[], float] = lambda: 0.0,
) -> CellResult:
    """`make_body(i)` -> (json body, items, tokens). New requests stop after `duration`; the
    in-flight ones finish and count (throughput = completed work / wall time). `server_cpu()`:
    the server's CPU seconds so far, read at both ends of the measured span."""
    result = CellResult()
    numbers = count()
    # a client (one connection) per worker: in one shared pool a lagging event loop can close
    # a connection handed to a request before it is sent (see tests/test_hardening_e2e.py)
    limits = httpx.Limits(max_connections=1, keepalive_expiry=1)
    clients = [httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits)
               for _ in range(concurrency)]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)

        async def worker(client: httpx.AsyncClient, stop_at: float, record: bool) -> None:
            while time.perf_counter() < stop_at:
                body, items, tokens = make_body(next(numbers))
                start = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not record:
                    continue
                result.requests += 1
                if ok:
                    result.latencies.append(time.perf_counter() - start)
                    result.items += items
                    result.tokens += tokens
                else:
                    result.errors += 1

        now = time.perf_counter()
        await asyncio.gather(*(worker(c, now + warmup, False) for c in clients))
        cpu = server_cpu(), time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(worker(c, began + duration, True) for c in clients))
        result.elapsed = time.perf_counter() - began
        result.server_cpu_s = server_cpu() - cpu[0]
        result.client_cpu_s = time.process_time() - cpu[1]
    return result
