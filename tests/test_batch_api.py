"""The batchable BentoML methods (for Bento-to-Bento callers) under concurrency."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from conftest import MINILM


def test_batched_embed_matches_openai_route(client):
    texts = [f"batched text number {i}" for i in range(6)]
    items = [{"model": MINILM if i % 2 else "tiny-embed", "text": t} for i, t in enumerate(texts)]
    response = client.post("/batch/embed", json={"items": items})
    assert response.status_code == 200, response.text
    vectors = response.json()
    for item, vector in zip(items, vectors):
        direct = client.post("/v1/embeddings", json={"model": item["model"], "input": item["text"]})
        np.testing.assert_allclose(vector, direct.json()["data"][0]["embedding"], atol=1e-5)


def test_batched_embed_takes_a_prompt_name(client):
    items = [{"model": MINILM, "text": "tides", "prompt_name": "query"}, {"model": MINILM, "text": "tides"}]
    vectors = client.post("/batch/embed", json={"items": items}).json()
    direct = client.post("/v1/embeddings", json={"model": MINILM, "input": "tides",
                                                 "prompt_name": "query"}).json()
    plain = client.post("/v1/embeddings", json={"model": MINILM, "input": "query: tides"}).json()
    np.testing.assert_allclose(vectors[0], direct["data"][0]["embedding"], atol=1e-5)
    np.testing.assert_allclose(vectors[0], plain["data"][0]["embedding"], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    bad = client.post("/batch/embed", json={"items": [{"model": MINILM, "text": "x", "prompt_name": "nope"}]})
    assert bad.status_code == 400 and "prompt_name: 'nope' is not a prompt of model" in bad.text


def test_bad_caller_does_not_fail_concurrent_good_callers(client):
    def call(i):
        model = "nope" if i % 5 == 0 else MINILM
        return i, client.post("/batch/embed", json={"items": [{"model": model, "text": f"caller {i}"}]})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(40)))
    for i, response in results:
        if i % 5 == 0:
            assert response.status_code == 400 and "model 'nope' is not served here" in response.text
        else:
            assert response.status_code == 200, response.text
            assert len(response.json()[0]) == 384


def test_batched_rerank_scores_match_rerank_route(client):
    docs = ["warranty for two years", "red and blue", "one-year warranty"]
    items = [{"model": "tiny-rerank", "query": "warranty?", "document": d} for d in docs]
    items.append({"model": "tiny-rerank", "query": "colours?", "document": docs[1]})
    scores = client.post("/batch/rerank", json={"items": items}).json()
    ranked = client.post("/v1/rerank", json={"model": "tiny-rerank", "query": "warranty?", "documents": docs}).json()
    by_index = {r["index"]: r["relevance_score"] for r in ranked["results"]}
    np.testing.assert_allclose(scores[:3], [by_index[i] for i in range(3)], atol=1e-5)
    other = client.post("/v1/rerank", json={"model": "tiny-rerank", "query": "colours?", "documents": [docs[1]]}).json()
    np.testing.assert_allclose(scores[3], other["results"][0]["relevance_score"], atol=1e-5)


def test_batched_capability_mismatch_is_a_400(client):
    response = client.post("/batch/rerank", json={"items": [{"model": MINILM, "query": "q", "document": "d"}]})
    assert response.status_code == 400 and "does not support reranking" in response.text
