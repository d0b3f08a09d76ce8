"""What is sent cannot drift from the OpenAPI document: the bytes of every response shape are
validated against the model that documents it (the models forbid undeclared keys)."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from conftest import MINILM
from embedding_worker.api.routes import ROUTES
from embedding_worker.core.dialects.tei import TeiError
from embedding_worker.core.schemas import (
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
    RerankResponse,
    RunSyncResponse,
)

DOCS = ["a warranty of two years", "red and blue", "electronics"]


@pytest.mark.parametrize("body", [
    {"model": MINILM, "input": ["one", "two"]},
    {"model": MINILM, "input": "one", "encoding_format": "base64"},
    {"model": "tiny-embed", "input": "one", "dimensions": 4},
])
def test_embeddings(client, body):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 200
    EmbeddingResponse.model_validate_json(response.content)


@pytest.mark.parametrize("extra", [{}, {"return_documents": True, "top_n": 2}])
def test_rerank(client, extra):
    response = client.post("/v1/rerank", json={"model": "tiny-rerank", "query": "q", "documents": DOCS,
                                               **extra})
    assert response.status_code == 200
    parsed = RerankResponse.model_validate_json(response.content)
    documents = [result.get("document") for result in response.json()["results"]]
    assert all(documents) if extra else "document" not in response.text
    assert len(parsed.results) == (2 if extra else 3)


def test_models(client):
    ModelList.model_validate_json(client.get("/v1/models").content)


@pytest.mark.parametrize("method, path, body, status", [
    ("post", "/v1/embeddings", {"model": MINILM, "input": []}, 400),
    ("post", "/v1/embeddings", {"model": "nope", "input": "x"}, 404),
    ("post", "/v1/embeddings", {"model": MINILM, "input": ["x"] * 101}, 413),
    ("get", "/v1/nowhere", None, 404),
    ("get", "/v1/embeddings", None, 405),
])
def test_errors(client, method, path, body, status):
    response = getattr(client, method)(path, **({} if body is None else {"json": body}))
    assert response.status_code == status
    ErrorResponse.model_validate_json(response.content)


@pytest.mark.parametrize("job, status", [
    ({"openai_route": "/v1/models"}, "COMPLETED"),
    ({"model": MINILM, "input": "x"}, "COMPLETED"),
    ({"model": "nope", "input": "x"}, "FAILED"),
])
def test_runsync(client, job, status):
    response = client.post("/runsync", json={"input": job})
    assert RunSyncResponse.model_validate_json(response.content).status == status


def test_an_undeclared_key_would_be_caught():
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ErrorResponse.model_validate_json(
            b'{"error": {"message": "m", "type": "t", "param": null, "code": null, "extra": 1}}')


def declared(path: str) -> TypeAdapter:
    """The response type the route table documents for `path`."""
    return TypeAdapter(next(route.response for route in ROUTES if path in route.paths))


@pytest.mark.parametrize("method, path, body", [
    ("post", "/v2/embed", {"model": MINILM, "texts": ["a"], "input_type": "search_query",
                           "embedding_types": ["float", "int8", "ubinary", "base64"]}),
    ("post", "/v1/embed", {"model": MINILM, "texts": ["a"]}),
    ("post", "/v1/embed", {"texts": ["a"], "embedding_types": ["binary"]}),
    ("post", "/v1/tokenize", {"model": MINILM, "input": ["a b", "c"], "prompt_name": None}),
    ("post", "/v1/tokenize", {"model": MINILM, "input": "a", "prompt_name": "query"}),
    ("post", "/embed", {"inputs": ["a", "b"], "normalize": True}),
    ("post", "/rerank", {"query": "q", "texts": DOCS, "return_text": True}),
    ("post", "/rerank", {"model": "tiny-rerank", "query": "q", "documents": DOCS}),
    ("post", "/tokenize", {"inputs": "a b"}),
    ("post", "/decode", {"ids": [[101, 102], [7592]]}),
    ("post", "/", {"inputs": "a"}),
    ("post", "/", {"query": "q", "texts": DOCS}),
    ("get", "/info", None),
    ("get", "/health", None),
])
def test_dialect_routes(client, method, path, body):
    response = getattr(client, method)(path, **({} if body is None else {"json": body}))
    assert response.status_code == 200, response.text
    declared(path).validate_json(response.content)


@pytest.mark.parametrize("path, body, status", [
    ("/embed", {"inputs": []}, 400),
    ("/predict", {"inputs": "x"}, 400),  # no classifier served here
    ("/tei/nope/embed", {"inputs": "x"}, 404),
    ("/rerank", {"query": "q", "texts": "not a list"}, 400),
])
def test_tei_errors(client, path, body, status):
    response = client.post(path, json=body)
    assert response.status_code == status
    TeiError.model_validate_json(response.content)


@pytest.mark.parametrize("body, message", [
    ({"model": MINILM, "texts": ["a"], "images": ["b"]}, "exactly one of texts, images, inputs"),
    ({"model": MINILM, "inputs": [{"content": ["a"]}]}, "inputs[0].content[0]: expected"),
    ({"model": MINILM, "inputs": [{"content": [{"type": "text", "text": " "}]}]},
     "inputs[0].content[0]: expected"),
])
def test_cohere_errors_are_openai_envelopes(client, body, message):
    response = client.post("/v2/embed", json=body)
    assert response.status_code == 400
    assert message in ErrorResponse.model_validate_json(response.content).error.message


def test_a_tei_body_may_name_its_model(client):
    default = client.post("/embed", json={"inputs": "a"}).json()
    named = client.post("/embed", json={"inputs": "a", "model": "tiny-embed"}).json()
    assert len(default[0]) == 384 and len(named[0]) == 32  # MiniLM first; the tiny one named
    wrong = client.post("/embed", json={"inputs": "a", "model": "tiny-rerank"})
    assert wrong.status_code == 400 and "does not support text embeddings" in wrong.json()["error"]
