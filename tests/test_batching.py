"""The engine's batches are formed from every waiting text by length: concurrent requests share
engine calls, each still gets exactly its own rows and usage, nothing waits forever, and callers
that leave take their work with them."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest

from embedding_worker.core.batching import LengthBatcher
from embedding_worker.config import Settings
from embedding_worker.core.core import Core


@pytest.fixture(scope="module")
async def core(tiny_models):
    core = Core(Settings(model_names=str(tiny_models["embed"]), served_model_names="tiny-embed",
                         batch_sizes="32", dtypes="fp32"))  # fp32's numbers, held to torch
    await core.start()
    yield core
    await core.stop()


async def test_concurrent_requests_share_batches_and_each_gets_its_own_rows_and_usage(core, tiny_models):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_models["embed"]), device="cpu")
    requests = [[f"request {i} text {j} " + "word " * (i + j) for j in range(1 + i % 3)] for i in range(24)]
    guard = core.models.get("tiny-embed").heartbeat
    before = guard.batches
    results = await asyncio.gather(*(core.embeddings.create({"model": "tiny-embed", "input": texts})
                                     for texts in requests))
    assert guard.batches - before < len(requests) / 2, "concurrent requests did not share batches"
    for texts, result in zip(requests, results):
        got = np.array([d["embedding"] for d in result["data"]])
        np.testing.assert_allclose(got, st.encode(texts, normalize_embeddings=True), atol=1e-5)
        expected = sum(len(st.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        assert result["usage"]["prompt_tokens"] == expected


async def test_texts_past_the_models_window_share_a_batch_whatever_their_length(core, tiny_models):
    # the tiny model's window is 128 tokens: both texts are truncated to it and cost the same, so
    # they go in one engine call although one is three times the other's characters (uncapped,
    # their lengths would be 67 % padding apart and go in two calls)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_models["embed"]), device="cpu")
    overlong = [("alpha beta gamma " * 600)[:9000], ("delta epsilon " * 300)[:3000]]
    guard = core.models.get("tiny-embed").heartbeat
    batcher = core.embeddings.batcher(core.models.get("tiny-embed"))
    before = guard.batches
    busy = asyncio.ensure_future(core.embeddings.create({"model": "tiny-embed", "input": ["busy " * 100] * 32}))
    while not batcher.in_flight:  # the engine is busy: the overlong texts wait and are batched
        await asyncio.sleep(0)
    result = await core.embeddings.create({"model": "tiny-embed", "input": overlong})
    await busy
    assert guard.batches - before == 2  # the busy call, then one call for both overlong texts
    got = np.array([d["embedding"] for d in result["data"]])
    np.testing.assert_allclose(got, st.encode(overlong, normalize_embeddings=True), atol=1e-5)


@pytest.fixture
async def torch_core(tiny_models):
    core = Core(Settings(model_names=str(tiny_models["embed"]), served_model_names="tiny-embed",
                         backend="torch"))
    await core.start()
    yield core
    await core.stop()


async def test_a_computed_batch_is_returned_without_infinitys_post_processing_sleep(torch_core,
                                                                                   monkeypatch):
    """infinity 0.0.78's post-processing thread sleeps 5 ms before finishing almost every batch
    (its guard is always true); the engines are started with that delay at 0, so a lone request
    does not wait on it."""
    from infinity_emb.inference import batch_handler

    core = torch_core
    slept: list[tuple[str, float]] = []

    class Clock:  # infinity's `time`, recording which of its loops sleeps how long
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            slept.append((sys._getframe(1).f_code.co_name, seconds))
            time.sleep(seconds)

    monkeypatch.setattr(batch_handler, "time", Clock())
    for i in range(5):
        result = await core.embeddings.create({"model": "tiny-embed", "input": f"lone text {i}"})
        assert len(result["data"]) == 1
    post = [seconds for loop, seconds in slept if loop == "_postprocess_batch"]
    assert post, "the post-processing loop was not observed"
    assert max(post) == 0


async def test_concurrent_rerank_requests_with_different_queries_share_batches(tiny_models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    core = Core(Settings(model_names=str(tiny_models["rerank"]), served_model_names="tiny-rerank",
                         batch_sizes="32", dtypes="fp32"))
    await core.start()
    try:
        requests = [(f"query {i}" + " why" * i, [f"doc {i}.{j} " + "text " * (3 * j + i)
                                                 for j in range(2 + i % 4)]) for i in range(24)]
        guard = core.models.get("tiny-rerank").heartbeat
        before = guard.batches
        results = await asyncio.gather(*(
            core.rerank.create({"model": "tiny-rerank", "query": q, "documents": d, "raw_scores": True})
            for q, d in requests))
        assert guard.batches - before < len(requests) / 2, "concurrent requests did not share batches"
    finally:
        await core.stop()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["rerank"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["rerank"]).eval()
    for (query, docs), result in zip(requests, results):
        with torch.no_grad():
            logits = model(**tokenizer([query] * len(docs), docs, padding=True,
                                       return_tensors="pt")).logits[:, 0].numpy()
        assert [r["index"] for r in result["results"]] == list(np.argsort(-logits, kind="stable"))
        got = {r["index"]: r["relevance_score"] for r in result["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(docs))], logits, atol=1e-4)
        # usage as infinity counts it: query and document as one text, special tokens excluded
        expected = sum(len(tokenizer(query + d, add_special_tokens=False)["input_ids"]) for d in docs)
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
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=10)
    first = asyncio.ensure_future(batcher.submit(["a"]))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batcher.submit([f"{i}x", f"{i}y"])) for i in range(3)]
    await asyncio.sleep(0.01)
    assert gate.calls == [["a"]]  # the others wait for the slot
    gate.release.set()
    assert await first == ["row:a"]
    assert [await r for r in rest] == [[f"row:{i}x", f"row:{i}y"] for i in range(3)]
    assert gate.calls[1] == ["0x", "0y", "1x", "1y", "2x", "2y"]  # one shared call


async def test_batches_group_similar_lengths_around_the_oldest_text():
    gate = Gate()
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=3)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0)
    # arrival order mixes lengths; the oldest waiting text is 5 characters long
    texts = ["x" * 5, "y" * 90, "z" * 4, "w" * 100, "v" * 6, "u" * 95, "t" * 80]
    requests = [asyncio.ensure_future(batcher.submit([t])) for t in texts]
    await asyncio.sleep(0)
    gate.release.set()
    assert [await r for r in requests] == [[f"row:{t}"] for t in texts]
    assert await busy == ["row:busy"]
    sent = [sorted(map(len, call)) for call in gate.calls[1:]]
    # first the short ones (with the oldest), then the longest run that holds the next oldest
    assert sent == [[4, 5, 6], [90, 95, 100], [80]]


async def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order():
    gate = Gate()
    gate.release.set()
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=4)
    texts = ["a" * (i % 5 + 1) + str(i) for i in range(11)]
    assert await batcher.submit(texts) == [f"row:{t}" for t in texts]
    assert [len(call) for call in gate.calls] == [4, 4, 3]


async def test_under_sustained_short_texts_a_long_one_is_not_starved():
    gate = Gate()
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=2)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0)
    long = asyncio.ensure_future(batcher.submit(["L" * 500]))
    shorts = [asyncio.ensure_future(batcher.submit([f"s{i}"])) for i in range(20)]
    await asyncio.sleep(0)
    gate.release.set()
    await long
    # the long text was the oldest waiting one: it went in the very next call
    assert "L" * 500 in gate.calls[1]
    await asyncio.gather(busy, *shorts)


async def test_a_caller_that_leaves_before_sending_is_withdrawn():
    gate = Gate()
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=10)
    first = asyncio.ensure_future(batcher.submit(["a"]))
    await asyncio.sleep(0)
    leaving = asyncio.ensure_future(batcher.submit(["gone"]))
    staying = asyncio.ensure_future(batcher.submit(["kept"]))
    await asyncio.sleep(0)
    leaving.cancel()
    gate.release.set()
    await first
    assert await staying == ["row:kept"]
    assert gate.calls == [["a"], ["kept"]]


async def test_a_shared_call_is_cancelled_only_when_every_caller_left():
    gate = Gate()
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=10)
    first = asyncio.ensure_future(batcher.submit(["a"]))
    await asyncio.sleep(0)
    one, two = (asyncio.ensure_future(batcher.submit([t])) for t in ("b", "c"))
    await asyncio.sleep(0)
    first.cancel()  # a lone call: its engine work stops with it
    await asyncio.sleep(0.01)
    assert gate.cancelled == 1 and gate.calls[-1] == ["b", "c"]
    one.cancel()
    await asyncio.sleep(0.01)
    assert gate.cancelled == 1  # `two` still waits for the shared call
    two.cancel()
    await asyncio.sleep(0.01)
    assert gate.cancelled == 2 and batcher.in_flight == 0


async def test_an_engine_error_reaches_every_caller_of_the_shared_call():
    async def broken(texts):
        raise RuntimeError("engine down")

    batcher = LengthBatcher(broken, max_in_flight=0, max_items=10)  # everything waits, then goes
    calls = [asyncio.ensure_future(batcher.submit([t])) for t in "ab"]
    await asyncio.sleep(0)
    batcher.max_in_flight = 1
    batcher._dispatch()
    for call in calls:
        with pytest.raises(RuntimeError, match="engine down"):
            await call


async def test_a_long_text_does_not_pad_a_batch_of_short_ones():
    gate = Gate()
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=8)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0)
    texts = ["q" * (10 + i) for i in range(7)] + ["P" * 1000]
    waiting = asyncio.ensure_future(batcher.submit(texts))  # eight texts: one batch's worth
    await asyncio.sleep(0)
    gate.release.set()
    assert await waiting == [f"row:{t}" for t in texts]
    assert [sorted(map(len, call)) for call in gate.calls[1:]] == [list(range(10, 17)), [1000]]
    await busy


async def test_passages_share_a_batch_only_with_close_lengths():
    # on a CPU every padded token costs compute: passages 40 % apart in length go in two batches
    # (one batch would be 20 % padding); short texts 4x apart stay together, as padding them
    # costs less than another engine call
    gate = Gate()
    batcher = LengthBatcher(gate, max_in_flight=1, max_items=4)
    busy = asyncio.ensure_future(batcher.submit(["busy"]))
    await asyncio.sleep(0)
    texts = ["P" * 1000, "p" * 600] * 2 + ["q" * 10, "q" * 40] * 2
    waiting = asyncio.ensure_future(batcher.submit(texts))
    await asyncio.sleep(0)
    gate.release.set()
    assert await waiting == [f"row:{t}" for t in texts]
    assert [sorted(map(len, call)) for call in gate.calls[1:]] == [
        [1000, 1000], [600, 600], [10, 10, 40, 40]]
    await busy


async def test_a_busy_engine_gets_a_second_call_only_for_a_batch_worth_of_texts():
    gate = Gate()
    batcher = LengthBatcher(gate, max_in_flight=2, max_items=4)
    running = asyncio.ensure_future(batcher.submit(["running"]))
    await asyncio.sleep(0.01)
    few = [asyncio.ensure_future(batcher.submit([f"t{i}"])) for i in range(3)]
    await asyncio.sleep(0.01)
    assert len(gate.calls) == 1  # three texts wait for the running call rather than go alone
    more = asyncio.ensure_future(batcher.submit(["t3"]))
    await asyncio.sleep(0.01)
    assert len(gate.calls) == 2 and sorted(gate.calls[1]) == ["t0", "t1", "t2", "t3"]
    gate.release.set()
    await asyncio.gather(running, *few, more)
