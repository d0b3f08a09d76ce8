"""Infinity's own API (infinity_emb v2) through its own clients, unchanged but for the URL:
`infinity-client` (generated from Infinity's OpenAPI document, strict about `owned_by` and its
enums) with its default model and `dimensions: 0`, and LangChain's InfinityRerank on it. Vectors
and scores equal `/v1/embeddings`' and `/v1/rerank`'s; `/rerank`'s documents are the texts."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import MINILM
from imagehost import image_bytes

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force.",
         "A cat on a mat"]
# infinity-client 0.0.78 wants httpx<0.28, LiteLLM (test_clients.py) >=0.28: its own install
INFINITY_CLIENT = ["infinity-client==0.0.78", "httpx<0.28"]


@pytest.fixture(scope="session")
def infinity_client_path(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("infinity-client")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--target", str(target), *INFINITY_CLIENT], check=True)
    return target


@pytest.fixture(scope="module")
def parsed(dialect_server, infinity_client_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(infinity_client_path),
                                                         *sys.path[1:]])}
    run = subprocess.run([sys.executable, str(HERE / "clients" / "infinity_calls.py"),
                          dialect_server.url, MINILM, "tiny-rerank", "tiny-classify", *TEXTS],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def post(server, path, body):
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_parse_strictly(parsed, dialect_server):
    ours = httpx.get(f"{dialect_server.url}/v1/models").json()["data"]
    assert [m["id"] for m in parsed["models"]] == [m["id"] for m in ours]
    assert {m["owned_by"] for m in parsed["models"]} == {"infinity"}
    assert parsed["health"] == 200


def test_embeddings_with_the_clients_defaults(parsed, dialect_server):
    full = post(dialect_server, "/v1/embeddings", {"model": MINILM, "input": TEXTS})
    expected = [d["embedding"] for d in full["data"]]
    # no model named: the first served model that embeds (MiniLM); dimensions 0: the full size
    assert parsed["default"]["model"] == MINILM and parsed["default"]["id"].startswith("infinity-")
    np.testing.assert_allclose(parsed["default"]["vectors"], expected, rtol=0, atol=1e-6)
    assert parsed["default"]["tokens"] == full["usage"]["total_tokens"]
    cut = post(dialect_server, "/v1/embeddings", {"model": MINILM, "input": TEXTS, "dimensions": 32})
    np.testing.assert_allclose(parsed["named"]["vectors"], [d["embedding"] for d in cut["data"]],
                               rtol=0, atol=1e-6)


def test_rerank_documents_are_texts_and_scores_equal(parsed, dialect_server):
    ours = post(dialect_server, "/v1/rerank", {"model": "tiny-rerank", "query": TEXTS[0],
                                                "documents": TEXTS, "return_documents": True})
    assert [(r["index"], r["document"]) for r in parsed["rerank"]] == [
        (r["index"], r["document"]["text"]) for r in ours["results"]]
    np.testing.assert_allclose([r["relevance_score"] for r in parsed["rerank"]],
                               [r["relevance_score"] for r in ours["results"]], atol=1e-6)
    assert [(r["index"], r["relevance_score"]) for r in parsed["langchain"]] == [
        (r["index"], r["relevance_score"]) for r in parsed["rerank"][:2]]


def test_classify(parsed, dialect_server):
    ours = post(dialect_server, "/v1/classify", {"model": "tiny-classify", "input": TEXTS})
    assert parsed["classify"] == ours["data"]


def test_the_other_infinity_routes(dialect_server):
    """`/embeddings_image` (CLIP) equals `modality: image`; `/embeddings_audio` with no model
    named and none served that embeds audio is a 400 saying so."""
    image = "data:image/png;base64," + base64.b64encode(image_bytes("PNG", "red")).decode()
    legacy = post(dialect_server, "/embeddings_image", {"model": "tiny-clip", "input": [image]})
    ours = post(dialect_server, "/v1/embeddings", {"model": "tiny-clip", "input": [image],
                                                   "modality": "image"})
    assert legacy["data"][0]["embedding"] == ours["data"][0]["embedding"]
    audio = httpx.post(f"{dialect_server.url}/embeddings_audio", json={"input": ["x"]})
    assert audio.status_code == 400, audio.text
    assert audio.json()["error"]["message"].startswith("no served model does audio embeddings")
    assert "unix" in httpx.get(f"{dialect_server.url}/health").json()
