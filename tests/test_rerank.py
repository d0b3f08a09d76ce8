"""Reranking through the real service against a direct transformers computation."""

import numpy as np
import pytest

QUERY = "Which product has warranty coverage?"
DOCS = [
    "Product A comes with a 2-year warranty",
    "Product B is available in red and blue colors",
    "All electronics include a standard 1-year warranty",
    "Shipping is free for orders over $50",
    "Returns are accepted within 30 days",
    "Warranty claims require the original receipt",
]


@pytest.fixture(scope="module")
def logits(tiny_models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_models["rerank"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = tokenizer([QUERY] * len(DOCS), DOCS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0].numpy()


def rerank(client, path="/v1/rerank", **body):
    response = client.post(path, json={"model": "tiny-rerank", "query": QUERY, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_scores_and_order_match_direct_computation(client, logits):
    payload = rerank(client, documents=DOCS)
    assert payload["object"] == "rerank" and payload["model"] == "tiny-rerank"
    indices = [r["index"] for r in payload["results"]]
    assert indices == list(np.argsort(-logits))
    scores = np.array([r["relevance_score"] for r in payload["results"]])
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits[indices])), atol=1e-4)
    assert all("document" not in r for r in payload["results"])
    assert payload["usage"]["total_tokens"] > 0


def test_raw_scores_are_logits(client, logits):
    payload = rerank(client, documents=DOCS, raw_scores=True)
    got = {r["index"]: r["relevance_score"] for r in payload["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], logits, atol=1e-3)


def test_top_n_and_return_documents(client, logits):
    payload = rerank(client, documents=DOCS, top_n=2, return_documents=True)
    best = list(np.argsort(-logits))[:2]
    assert [r["index"] for r in payload["results"]] == best
    assert [r["document"] for r in payload["results"]] == [{"text": DOCS[i]} for i in best]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/openai/v1/rerank"])
def test_seed_shape_docs_and_return_docs(client, path):
    payload = rerank(client, path=path, docs=DOCS[:3], return_docs=True)
    assert sorted(r["index"] for r in payload["results"]) == [0, 1, 2]
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in payload["results"])


def test_unprefixed_rerank_is_infinitys_with_the_same_scores(client):
    """`/rerank` answers as Infinity's server: the document itself (null unless asked for)."""
    ours = rerank(client, docs=DOCS[:3], top_n=2, return_docs=True)
    theirs = rerank(client, path="/rerank", documents=DOCS[:3], top_n=2, return_documents=True)
    assert [(r["index"], r["relevance_score"]) for r in theirs["results"]] == [
        (r["index"], r["relevance_score"]) for r in ours["results"]]
    assert [r["document"] for r in theirs["results"]] == [DOCS[r["index"]] for r in theirs["results"]]
    assert theirs["id"].startswith("infinity-") and theirs["usage"] == ours["usage"]
    plain = rerank(client, path="/rerank", documents=DOCS[:3])
    assert [r["document"] for r in plain["results"]] == [None] * 3


def test_top_n_larger_than_documents_returns_all(client):
    assert len(rerank(client, documents=DOCS[:3], top_n=10)["results"]) == 3
