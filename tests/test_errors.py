"""Every caller mistake gets the OpenAI envelope with the right 4xx status, never a 500."""

import pytest

from conftest import MINILM

LONG = ["x"] * 101  # MAX_INPUT_ITEMS=100 in the test service


def envelope(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


EMBEDDING_CASES = [
    ({"model": "nope", "input": "a"}, 404, f"model 'nope' is not served here; available models: {MINILM}, tiny-embed, tiny-rerank, tiny-clip"),
    ({"model": "tiny-rerank", "input": "a"}, 400, "model 'tiny-rerank' does not support text embeddings; it supports: reranking"),
    ({"input": "a"}, 400, "model: field required"),
    ({"model": MINILM}, 400, "input: field required"),
    ({"model": MINILM, "input": ""}, 400, "input[0]: empty string"),
    ({"model": MINILM, "input": []}, 400, "input: must not be empty"),
    ({"model": MINILM, "input": ["ok", "ok", "   "]}, 400, "input[2]: empty string"),
    ({"model": MINILM, "input": ["ok", 3]}, 400, "input[1]: expected a string, got int"),
    ({"model": MINILM, "input": ["ok", None]}, 400, "input[1]: expected a string, got null"),
    ({"model": MINILM, "input": {"text": "a"}}, 400, "input: expected a string or a list of strings, got dict"),
    ({"model": MINILM, "input": [1, 2, 3]}, 400, "input: token-id arrays are not supported; send the text itself"),
    ({"model": MINILM, "input": [[1, 2], [3]]}, 400, "input: token-id arrays are not supported"),
    ({"model": MINILM, "input": LONG}, 413, "input: 101 items, at most 100 per request (MAX_INPUT_ITEMS)"),
    ({"model": MINILM, "input": "a", "encoding_format": "int8"}, 400, "encoding_format: Input should be 'float' or 'base64'"),
    ({"model": MINILM, "input": "a", "dimensions": 0}, 400, "dimensions: Input should be greater than or equal to 1"),
    ({"model": MINILM, "input": "a", "dimensions": 385}, 400, "dimensions: 385 is out of range; model 'sentence-transformers/all-MiniLM-L6-v2' produces 384 dimensions, so use 1..384"),
    ({"model": MINILM, "input": "a", "dimensions": "big"}, 400, "dimensions: Input should be a valid integer"),
    ({"model": MINILM, "input": "a", "modality": "video"}, 400, "modality: 'video' is not supported; expected one of text, image, audio"),
    ({"model": MINILM, "input": "a", "modality": "audio"}, 400, f"model '{MINILM}' does not support audio embeddings; it supports: text embeddings"),
    ({"model": MINILM, "input": "https://x/y.png", "modality": "image"}, 400, f"model '{MINILM}' does not support image embeddings; it supports: text embeddings"),
    ({"model": 5, "input": "a"}, 400, "model: Input should be a valid string"),
    # Jina's name for output_dtype: the message names what the client sent
    ({"model": MINILM, "input": "a", "embedding_type": 0}, 400, "embedding_type: 0 is not supported; expected one of float, int8, uint8, binary, ubinary, base64"),
]


@pytest.mark.parametrize("body, status, message", EMBEDDING_CASES)
def test_embedding_errors(client, body, status, message):
    error = envelope(client.post("/v1/embeddings", json=body), status)
    assert error["message"].startswith(message), error["message"]


RERANK_CASES = [
    ({"model": MINILM, "query": "q", "documents": ["a"]}, 400, f"model '{MINILM}' does not support reranking; it supports: text embeddings"),
    ({"model": "tiny-rerank", "query": "", "documents": ["a"]}, 400, "query: String should have at least 1 character"),
    ({"model": "tiny-rerank", "query": "  ", "documents": ["a"]}, 400, "query: empty string"),
    ({"model": "tiny-rerank", "query": "q"}, 400, "documents: field required"),
    ({"model": "tiny-rerank", "query": "q", "documents": []}, 400, "documents: must not be empty"),
    ({"model": "tiny-rerank", "query": "q", "documents": "a"}, 400, "documents: expected a list of strings, got a single string"),
    ({"model": "tiny-rerank", "query": "q", "docs": ["a", ""]}, 400, "docs[1]: empty string"),
    ({"model": "tiny-rerank", "query": "q", "documents": ["a"] * 51}, 413, "documents: 51 items, at most 50 per request (MAX_RERANK_DOCUMENTS)"),
    ({"model": "tiny-rerank", "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n: Input should be greater than or equal to 1"),
    ({"model": "tiny-rerank", "query": "q", "documents": ["a"], "return_documents": "perhaps"}, 400, "return_documents: Input should be a valid boolean"),
]


@pytest.mark.parametrize("body, status, message", RERANK_CASES)
def test_rerank_errors(client, body, status, message):
    error = envelope(client.post("/v1/rerank", json=body), status)
    assert error["message"].startswith(message), error["message"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "request body is not valid JSON"),
        (b"", "request body is empty; expected a JSON object"),
        (b"[1, 2]", "request body must be a JSON object, got list"),
        (b"null", "request body must be a JSON object, got null"),
        (b"\xff\xfe", "request body is not valid JSON"),
    ],
)
def test_malformed_bodies(client, content, message):
    for path in ("/v1/embeddings", "/v1/rerank"):
        error = envelope(client.post(path, content=content, headers={"content-type": "application/json"}), 400)
        assert error["message"].startswith(message)


def test_unknown_route_and_wrong_method(client):
    assert envelope(client.get("/v1/nothing"), 404)["message"] == "no route GET /v1/nothing"
    assert envelope(client.post("/v2/embeddings", json={}), 404)["type"] == "not_found_error"
    assert envelope(client.get("/v1/embeddings"), 405)["message"] == "method GET is not allowed on /v1/embeddings"
    assert envelope(client.delete("/v1/models"), 405)
    assert client.get("/v1/embeddings").headers["allow"] == "POST"
    assert client.delete("/v1/models").headers["allow"] == "GET, HEAD"


def test_a_bad_request_does_not_disturb_the_next(client):
    envelope(client.post("/v1/embeddings", json={"model": MINILM, "input": ["a", ""]}), 400)
    assert client.post("/v1/embeddings", json={"model": MINILM, "input": ["a", "b"]}).status_code == 200


def test_health_routes(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
