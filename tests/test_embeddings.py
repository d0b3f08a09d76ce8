"""Embeddings through the real service in-process (BentoML lifecycle + infinity engines)."""

import base64

import numpy as np
import pytest

from conftest import MINILM
from embedding_worker.config import bundled_model_path

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "¿Dónde está la biblioteca?",
    "东京是日本的首都。",
    "a",
    "Warranty: two years for all electronics, one year for accessories.",
    "def add(a, b):\n    return a + b",
    "   leading and trailing spaces   ",
    "Emoji 🚀🔥 are text too",
    "UPPER CASE SHOUTING",
    "Numbers 3.14159 2.71828 1.41421",
    "A much longer passage. " * 40,
    "Search and retrieval-augmented generation rely on good embeddings.",
    "Cats sleep most of the day.",
    "The mitochondria is the powerhouse of the cell.",
    "SELECT * FROM users WHERE id = 1;",
    "https://example.com/path?query=1",
    "Ünïcödé ñörmälïzätïön",
    "The stock market fell sharply on Tuesday.",
    "I love pizza",
    "I hate pizza",
    "Rain is expected tomorrow afternoon.",
    "Quantum computers use qubits.",
]


def embed(client, **body):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def matrix(payload):
    return np.array([d["embedding"] for d in payload["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(bundled_model_path(), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def test_bundled_minilm_matches_sentence_transformers(client, reference):
    got = matrix(embed(client, model=MINILM, input=SENTENCES))
    assert got.shape == (len(SENTENCES), 384)
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_response_shape_order_and_usage(client):
    from transformers import AutoTokenizer

    texts = ["first text", "second, somewhat longer text", "third"]
    payload = embed(client, model=MINILM, input=texts, user="someone")
    assert payload["object"] == "list" and payload["model"] == MINILM
    assert [d["index"] for d in payload["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in payload["data"])
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    # the model tokenizer's count for the texts themselves (special tokens not counted)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert payload["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    # order preserved: each row equals the single-item embedding of the same text
    for text, row in zip(texts, matrix(payload)):
        np.testing.assert_allclose(matrix(embed(client, model=MINILM, input=text))[0], row, atol=1e-5)


def test_string_input_and_seed_modality_field(client):
    payload = embed(client, model=MINILM, input="Hello world", modality="text")
    assert len(payload["data"]) == 1 and len(payload["data"][0]["embedding"]) == 384


def test_base64_is_little_endian_float32_of_the_same_vector(client):
    floats = matrix(embed(client, model=MINILM, input=SENTENCES[:4]))
    b64 = embed(client, model=MINILM, input=SENTENCES[:4], encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    np.testing.assert_allclose(decoded, floats, atol=1e-6)


@pytest.mark.parametrize("dims", [1, 8, 100, 384])
def test_dimensions_truncate_then_renormalise(client, dims):
    full = matrix(embed(client, model=MINILM, input=SENTENCES[:3]))
    cut = matrix(embed(client, model=MINILM, input=SENTENCES[:3], dimensions=dims))
    assert cut.shape == (3, dims)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    expected = full[:, :dims] / np.linalg.norm(full[:, :dims], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)


def test_dimensions_with_base64(client):
    payload = embed(client, model=MINILM, input="x", dimensions=16, encoding_format="base64")
    assert len(base64.b64decode(payload["data"][0]["embedding"])) == 16 * 4


def test_routes_without_v1_prefix_are_infinitys_with_the_same_data(client):
    a = client.post("/embeddings", json={"model": MINILM, "input": "same"}).json()
    b = embed(client, model=MINILM, input="same")
    assert a["data"] == b["data"]
    assert a["id"].startswith("infinity-") and isinstance(a["created"], int)  # Infinity's keys
    cards = client.get("/models").json()["data"]
    assert {card["owned_by"] for card in cards} == {"infinity"}  # Infinity's client checks it
    assert [{**card, "owned_by": None} for card in cards] == [
        {**card, "owned_by": None} for card in client.get("/v1/models").json()["data"]]


def test_multi_model_routing_by_model_field(client, tiny_models):
    from sentence_transformers import SentenceTransformer

    tiny = matrix(embed(client, model="tiny-embed", input=SENTENCES[:5]))
    mini = matrix(embed(client, model=MINILM, input=SENTENCES[:5]))
    assert tiny.shape == (5, 32) and mini.shape == (5, 384)
    expected = SentenceTransformer(str(tiny_models["embed"]), device="cpu").encode(SENTENCES[:5])
    np.testing.assert_allclose(tiny, expected, atol=1e-4)


def test_models_list(client):
    payload = client.get("/v1/models").json()
    assert payload["object"] == "list"
    cards = {m["id"]: m for m in payload["data"]}
    assert list(cards) == [MINILM, "tiny-embed", "tiny-rerank", "tiny-clip"]
    assert cards["tiny-clip"]["capabilities"] == ["embed", "image_embed"]
    assert cards[MINILM]["capabilities"] == ["embed", "late_chunking", "token_embed"]  # mean-pooled, lean engine
    assert cards["tiny-rerank"]["capabilities"] == ["rerank"]
    # BACKEND=auto on a CPU: ONNX Runtime for the text models, torch for the image model
    assert {name: card["backend"] for name, card in cards.items()} == {
        MINILM: "optimum", "tiny-embed": "optimum", "tiny-rerank": "optimum", "tiny-clip": "torch"}
    for card in cards.values():
        assert card["object"] == "model" and isinstance(card["created"], int)
        assert card["device"] == "cpu" and card["batch_size"] == 16
        assert set(card["stats"]) == {"queue_fraction", "queue_absolute", "results_pending"}
