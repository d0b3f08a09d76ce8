"""Concurrent small requests share engine calls: each still gets exactly its own rows and usage,
and callers that leave take their work with them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedding_worker.coalesce import Coalescer
from embedding_worker.config import Settings
from embedding_worker.operations import Core


@pytest.fixture(scope="module")
async def core(tiny_models):
    previous = Core.current
    core = Core(Settings(model_names=str(tiny_models["embed"]), served_model_names="tiny-embed",
                         batch_sizes="32"))
    await core.start()
    yield core
    await core.stop()
    Core.current = previous


async def test_concurrent_requests_are_merged_and_each_gets_its_own_rows_and_usage(core, tiny_models):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_models["embed"]), device="cpu")
    requests = [[f"request {i} text {j} " + "word " * (i + j) for j in range(1 + i % 3)] for i in range(24)]
    guard = core.engines.guards["tiny-embed"]
    before = guard.batches
    results = await asyncio.gather(*(core.embed({"model": "tiny-embed", "input": texts})
                                     for texts in requests))
    assert guard.batches - before < len(requests) / 2, "concurrent requests were not merged"
    for texts, result in zip(requests, results):
        got = np.array([d["embedding"] for d in result["data"]])
        np.testing.assert_allclose(got, st.encode(texts, normalize_embeddings=True), atol=1e-5)
        expected = sum(len(st.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        assert result["usage"]["prompt_tokens"] == expected


class Gate:
    """An engine-call stand-in whose completion the test controls, recording what was sent."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, texts):
        self.calls.append(texts)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [f"row:{t}" for t in texts], len(texts)


async def test_waiting_callers_are_sent_together_and_split_back_in_order():
    gate = Gate()
    co = Coalescer(gate, max_in_flight=1, max_items=10)
    first = asyncio.ensure_future(co.embed(["a"]))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(co.embed([f"{i}x", f"{i}y"])) for i in range(3)]
    await asyncio.sleep(0)
    assert gate.calls == [["a"]]  # the others wait for the slot
    gate.release.set()
    assert await first == ["row:a"]
    assert [await r for r in rest] == [[f"row:{i}x", f"row:{i}y"] for i in range(3)]
    assert gate.calls[1] == ["0x", "0y", "1x", "1y", "2x", "2y"]  # one merged call


async def test_a_caller_that_leaves_before_sending_is_withdrawn():
    gate = Gate()
    co = Coalescer(gate, max_in_flight=1, max_items=10)
    first = asyncio.ensure_future(co.embed(["a"]))
    await asyncio.sleep(0)
    leaving = asyncio.ensure_future(co.embed(["gone"]))
    staying = asyncio.ensure_future(co.embed(["kept"]))
    await asyncio.sleep(0)
    leaving.cancel()
    gate.release.set()
    await first
    assert await staying == ["row:kept"]
    assert gate.calls == [["a"], ["kept"]]


async def test_a_merged_call_is_cancelled_only_when_every_caller_left():
    gate = Gate()
    co = Coalescer(gate, max_in_flight=1, max_items=10)
    first = asyncio.ensure_future(co.embed(["a"]))
    await asyncio.sleep(0)
    one, two = (asyncio.ensure_future(co.embed([t])) for t in ("b", "c"))
    await asyncio.sleep(0)
    first.cancel()  # a lone call: its engine work stops with it
    await asyncio.sleep(0.01)
    assert gate.cancelled == 1 and gate.calls[-1] == ["b", "c"]
    one.cancel()
    await asyncio.sleep(0.01)
    assert gate.cancelled == 1  # `two` still waits for the merged call
    two.cancel()
    await asyncio.sleep(0.01)
    assert gate.cancelled == 2 and co.in_flight == 0


async def test_an_engine_error_reaches_every_caller_of_the_merged_call():
    async def broken(texts):
        raise RuntimeError("engine down")

    co = Coalescer(broken, max_in_flight=0, max_items=10)  # everything waits, then merges
    calls = [asyncio.ensure_future(co.embed([t])) for t in "ab"]
    await asyncio.sleep(0)
    co.max_in_flight = 1
    co._next()
    for call in calls:
        with pytest.raises(RuntimeError, match="engine down"):
            await call
