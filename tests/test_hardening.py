"""Limits, overload, deadlines, stall detection and model faults, on real engines in-process.

Each test builds a core with the settings it is about (the HTTP mapping of these errors is covered
by tests/test_hardening_e2e.py against a real server)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from conftest import MINILM, running
from embedding_worker.config import bundled_model_path
from embedding_worker.core.errors import (
    BadRequest,
    DeadlineExceeded,
    ModelFault,
    Overloaded,
)
from models import make_faulty_embedder, make_faulty_reranker

PASSAGE = ("Embedding servers turn text into vectors that search systems compare by cosine "
           "similarity; long passages cost more because attention grows with the sequence. ") * 4


@pytest.fixture(scope="module")
def faulty_model(tmp_path_factory):
    return make_faulty_embedder(tmp_path_factory.mktemp("faulty") / "faulty")


@pytest.fixture(scope="module")
def faulty_reranker(tmp_path_factory):
    return make_faulty_reranker(tmp_path_factory.mktemp("faulty-rerank") / "faulty-rerank")


@contextlib.asynccontextmanager
async def started(**settings):
    async with running(**settings) as core:
        assert core.ready, core.engine.failure
        yield core


def minilm(**extra):
    return dict(model_names=bundled_model_path(), served_model_names=MINILM, **extra)


# --- limits ---

def test_text_over_max_text_chars_is_413(client):
    body = {"model": MINILM, "input": ["ok", "x" * 100_001]}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == (
        "input[1]: 100001 characters, at most 100000 per text (MAX_TEXT_CHARS)")
    r = client.post("/v1/rerank", json={"model": "tiny-rerank", "query": "q" * 100_001, "docs": ["a"]})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("query[0]: 100001 characters")


def test_long_text_is_truncated_and_usage_counts_what_the_model_saw(client):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    long_text, short = PASSAGE * 3, "A short query"
    r = client.post("/v1/embeddings", json={"model": MINILM, "input": [long_text, short]})
    assert r.status_code == 200
    window = 256 - 2  # MiniLM's max_seq_length less [CLS] and [SEP]
    assert len(tokenizer(long_text, add_special_tokens=False)["input_ids"]) > window
    expected = window + len(tokenizer(short, add_special_tokens=False)["input_ids"])
    assert r.json()["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


async def test_truncate_inputs_false_refuses_texts_over_the_window(tiny_models):
    async with started(model_names=f"{tiny_models['embed']};{tiny_models['rerank']}",
                       served_model_names="tiny-embed;tiny-rerank", truncate_inputs=False) as core:
        ok = await core.embeddings.create({"model": "tiny-embed", "input": ["fits easily"]})
        assert len(ok["data"]) == 1
        with pytest.raises(BadRequest) as err:
            await core.embeddings.create({"model": "tiny-embed", "input": ["fits", PASSAGE * 2]})
        assert err.value.code == "context_length_exceeded"
        assert err.value.message.startswith("input[1]: it is ")
        assert "over the model's window of 128 tokens (TRUNCATE_INPUTS=false" in err.value.message
        with pytest.raises(BadRequest) as err:
            await core.rerank.create({"model": "tiny-rerank", "query": "q", "docs": ["short", PASSAGE * 5]})
        assert err.value.message.startswith("documents[1]: query and document together are ")


# --- overload ---

async def test_over_max_concurrent_requests_gets_429_at_once_and_the_rest_complete():
    async with started(**minilm(max_concurrent_requests=2)) as core:
        texts = [[f"request {i} text {j}" for j in range(8)] for i in range(10)]
        results = await asyncio.gather(
            *(core.embeddings.create({"model": MINILM, "input": t}) for t in texts), return_exceptions=True)
        rejected = [r for r in results if isinstance(r, Overloaded)]
        served = [(t, r) for t, r in zip(texts, results) if isinstance(r, dict)]
        assert len(served) == 2 and len(rejected) == 8, results
        assert rejected[0].status == 429 and rejected[0].headers == {"Retry-After": "1"}
        assert "MAX_CONCURRENT_REQUESTS" in rejected[0].message
        for t, r in served:  # each accepted request got its own vectors
            alone = await core.embeddings.create({"model": MINILM, "input": t})
            np.testing.assert_allclose([d["embedding"] for d in r["data"]],
                                       [d["embedding"] for d in alone["data"]], atol=1e-5)
        assert core.pipeline.in_flight == 0 and core.pipeline.queued[MINILM] == 0


async def test_queue_bound_429_names_infinity_queue_size():
    async with started(**minilm(infinity_queue_size=50)) as core:
        first = {"model": MINILM, "input": [f"a{i}" for i in range(40)]}
        second = {"model": MINILM, "input": [f"b{i}" for i in range(40)]}
        done, refused = await asyncio.gather(core.embeddings.create(first), core.embeddings.create(second),
                                             return_exceptions=True)
        assert len(done["data"]) == 40
        assert isinstance(refused, Overloaded) and "INFINITY_QUEUE_SIZE=50" in refused.message
        # alone, a request larger than the bound is served
        assert len((await core.embeddings.create({"model": MINILM, "input": ["c"] * 60}))["data"]) == 60


# --- deadlines, cancellation, stalls ---

async def test_deadline_gives_504_and_drops_the_queued_work():
    async with started(**minilm(request_timeout=0.3, batch_sizes="8")) as core:
        model = core.models.get(MINILM)
        with pytest.raises(DeadlineExceeded) as err:
            await core.embeddings.create({"model": MINILM, "input": [f"{i} {PASSAGE}" for i in range(400)]})
        assert err.value.status == 504 and "REQUEST_TIMEOUT" in err.value.message
        # the abandoned items leave infinity's queue; only batches already handed to the model
        # thread are computed
        guard, t0 = model.heartbeat, time.monotonic()
        while model.queue().queue_absolute or guard.pending:
            assert time.monotonic() < t0 + 60, "cancelled items are still queued"
            await asyncio.sleep(0.05)
        while True:  # let the batches already in the model's pipeline finish
            before = guard.batches
            await asyncio.sleep(1)
            if guard.batches == before:
                break
        assert guard.batches < 400 // 8 / 2, "most of the abandoned work was computed anyway"
        assert (await core.embeddings.create({"model": MINILM, "input": ["next one"]}))["data"]
        assert core.pipeline.in_flight == 0 and core.models.get(MINILM).heartbeat.pending == 0


async def test_client_gone_cancels_without_marking_a_stall():
    async with started(**minilm(engine_stall_timeout=0.2)) as core:
        # distinct texts: identical ones would be computed once (the embedding cache)
        task = asyncio.ensure_future(core.embeddings.create(
            {"model": MINILM, "input": [f"{i} {PASSAGE}" for i in range(64)]}))
        await asyncio.sleep(0.2)
        task.cancel()  # as a transport does when its caller leaves
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        assert core.ready and core.pipeline.in_flight == 0


async def test_readiness_turns_false_while_the_batch_loop_makes_no_progress():
    # one batch of 96 long passages keeps the loop busy for seconds on a small CPU
    async with started(**minilm(engine_stall_timeout=0.3, batch_sizes="96")) as core:
        task = asyncio.ensure_future(core.embeddings.create(
            {"model": MINILM, "input": [f"{i} {PASSAGE * 2}" for i in range(96)]}))
        seen = []
        while not task.done():
            seen.append(core.ready)
            await asyncio.sleep(0.05)
        assert (await task)["data"]
        assert False in seen, "a batch far longer than ENGINE_STALL_TIMEOUT went unnoticed"
        assert core.ready  # a finished batch is progress again


# --- model faults ---

async def test_model_fault_fails_only_the_request_that_caused_it(faulty_model):
    # torch: ONNX Runtime's path truncates at the model's 16 positions, so it would not fail
    async with started(model_names=str(faulty_model), served_model_names="faulty",
                       batch_sizes="16", backend="torch") as core:
        good = [[f"short {i}", f"also short {i}"] for i in range(6)]
        bad = ["fine", "word " * 40]  # longer than the model's 16 positions
        results = await asyncio.gather(
            *(core.embeddings.create({"model": "faulty", "input": t}) for t in good),
            core.embeddings.create({"model": "faulty", "input": bad}),
            return_exceptions=True,
        )
        fault = results[-1]
        assert isinstance(fault, ModelFault) and fault.status == 500
        assert fault.message.startswith("model 'faulty' failed on input[1]: RuntimeError: ")
        for texts, result in zip(good, results[:-1]):
            assert isinstance(result, dict), result
            alone = await core.embeddings.create({"model": "faulty", "input": texts})
            np.testing.assert_allclose([d["embedding"] for d in result["data"]],
                                       [d["embedding"] for d in alone["data"]], atol=1e-5)
        assert core.ready  # the loop survived
        assert (await core.embeddings.create({"model": "faulty", "input": ["after the fault"]}))["data"]


async def test_rerank_fault_fails_only_the_request_that_caused_it(faulty_reranker):
    # concurrent requests with different queries share batches: the faulty pair's batch is
    # re-run pair by pair, and only its request fails
    async with started(model_names=str(faulty_reranker), served_model_names="faulty-rerank",
                       batch_sizes="16", backend="torch") as core:
        good = [(f"query {i}", [f"doc {i}", f"other {i}"]) for i in range(6)]
        bad = ("query", ["fine", "word " * 40])  # longer than the model's 16 positions
        results = await asyncio.gather(
            *(core.rerank.create({"model": "faulty-rerank", "query": q, "documents": d}) for q, d in good),
            core.rerank.create({"model": "faulty-rerank", "query": bad[0], "documents": bad[1]}),
            return_exceptions=True,
        )
        fault = results[-1]
        assert isinstance(fault, ModelFault) and fault.status == 500
        assert fault.message.startswith("model 'faulty-rerank' failed on documents[1]: ")
        for (query, docs), result in zip(good, results[:-1]):
            assert isinstance(result, dict), result
            alone = await core.rerank.create({"model": "faulty-rerank", "query": query, "documents": docs})
            assert [r["index"] for r in result["results"]] == [r["index"] for r in alone["results"]]
            np.testing.assert_allclose([r["relevance_score"] for r in result["results"]],
                                       [r["relevance_score"] for r in alone["results"]], atol=1e-5)
        assert core.ready

