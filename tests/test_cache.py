"""The embedding cache (core/cache.py): repeated texts come from memory with the same numbers,
identical texts in flight are computed once, the size bound holds, faults are not kept, and a
model can be left out."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client import REGISTRY

from conftest import running
from embedding_worker.core.cache import EmbeddingCache
from embedding_worker.observability import metrics


def lookups(model: str, result: str) -> float:
    return REGISTRY.get_sample_value(metrics.PREFIX + "cache_lookups_total",
                                     {"model": model, "result": result}) or 0


class Counting:
    """An engine call that records what it computed (the cache's `compute`)."""

    def __init__(self, delay: float = 0.0, fail: set[str] = frozenset()):
        self.calls: list[list[str]] = []
        self.delay, self.fail = delay, fail

    async def __call__(self, texts: list[str]) -> list:
        self.calls.append(list(texts))
        await asyncio.sleep(self.delay)
        return [float("nan") if t in self.fail else np.full(4, len(t), np.float32) for t in texts]


async def test_hits_and_duplicates_are_not_computed_again():
    cache, compute = EmbeddingCache(10**6), Counting()
    first = await cache.rows("m", ["a", "bb", "a"], compute)
    second = await cache.rows("m", ["bb", "ccc"], compute)
    assert compute.calls == [["a", "bb"], ["ccc"]]
    assert [r[0] for r in first] == [1, 2, 1] and [r[0] for r in second] == [2, 3]
    other = await cache.rows("other", ["a"], compute)  # another model: its own entries
    assert compute.calls[-1] == ["a"] and other[0][0] == 1


async def test_identical_texts_in_flight_are_computed_once():
    cache, compute = EmbeddingCache(10**6), Counting(delay=0.05)
    results = await asyncio.gather(*(cache.rows("m", ["same", f"own {i}"], compute)
                                     for i in range(5)))
    computed = [t for call in compute.calls for t in call]
    assert computed.count("same") == 1 and len(computed) == 6
    assert all(r[0][0] == 4 for r in results)


async def test_a_waiter_computes_itself_when_the_first_request_leaves():
    cache, compute = EmbeddingCache(10**6), Counting(delay=0.2)
    first = asyncio.ensure_future(cache.rows("m", ["shared"], compute))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(cache.rows("m", ["shared"], compute))
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second)[0][0] == 6
    assert compute.calls == [["shared"], ["shared"]]


async def test_requests_orphaned_together_compute_the_texts_once_in_one_call():
    cache, compute = EmbeddingCache(10**6), Counting(delay=0.2)
    texts = [f"text {i}" for i in range(20)]
    first = asyncio.ensure_future(cache.rows("orphans", texts, compute))
    await asyncio.sleep(0.01)
    waiters = [asyncio.ensure_future(cache.rows("orphans", texts, compute)) for _ in range(3)]
    await asyncio.sleep(0.01)
    first.cancel()
    results = await asyncio.gather(*waiters)
    assert compute.calls == [texts, texts]  # one call between the three, not a text at a time
    assert all([r[0] for r in result] == [6 if i < 10 else 7 for i in range(20)]
               for result in results)
    await cache.rows("orphans", texts, compute)  # and kept: not computed a third time
    assert len(compute.calls) == 2
    # each request's texts counted once, as first looked up: the recomputation is not counted
    assert [lookups("orphans", r) for r in ("miss", "coalesced", "hit")] == [20, 60, 20]


async def test_faults_are_not_kept_and_the_size_is_bounded():
    cache, compute = EmbeddingCache(2000), Counting(fail={"bad"})
    await cache.rows("m", ["bad"], compute)
    await cache.rows("m", ["bad"], compute)
    assert compute.calls == [["bad"], ["bad"]]
    for i in range(50):
        await cache.rows("m", [f"text {i}"], compute)
    assert 0 < len(cache) < 50 and cache.bytes <= 2000
    await cache.rows("m", ["text 49"], compute)  # the most recent stays: not computed again
    assert len(compute.calls) == 52
    await cache.rows("m", ["text 0"], compute)  # the oldest was evicted
    assert compute.calls[-1] == ["text 0"]


async def test_through_the_core_the_numbers_are_the_same(tiny_models):
    texts = ["a query", "a document about caching", "a query"]
    async with running(model_names=str(tiny_models["embed"]), served_model_names="m",
                       dtypes="fp32") as core:  # held to torch fp32 below
        model = core.models.get("m")
        cold = await core.embeddings.create({"model": "m", "input": texts})
        batches = model.heartbeat.batches
        warm = await core.embeddings.create({"model": "m", "input": texts, "dimensions": 8,
                                             "output_dtype": "int8"})
        assert model.heartbeat.batches == batches  # nothing reached the engine
        plain = await core.embeddings.create({"model": "m", "input": texts, "dimensions": 8,
                                              "output_dtype": "int8", "prompt_name": None})
        assert [d["embedding"].tolist() for d in warm["data"]] == \
            [d["embedding"].tolist() for d in plain["data"]]
        assert cold["usage"] == (await core.embeddings.create(
            {"model": "m", "input": texts}))["usage"]  # usage counts the texts as before
    async with running(model_names=str(tiny_models["embed"]), served_model_names="m",
                       embedding_cache="off", backend="torch") as core:
        model = core.models.get("m")
        await core.embeddings.create({"model": "m", "input": texts})
        batches = model.heartbeat.batches
        again = await core.embeddings.create({"model": "m", "input": texts})
        assert model.heartbeat.batches > batches  # off: computed again
        np.testing.assert_allclose([d["embedding"] for d in again["data"]],
                                   [d["embedding"] for d in cold["data"]], atol=1e-5)
