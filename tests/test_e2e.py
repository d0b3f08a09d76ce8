"""A real `bentoml serve` process on the bundled default model, driven by real clients."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

from conftest import MINILM, ROOT, SCRATCH_CACHE, assert_like
from embedding_worker.config import bundled_model_path
from embedding_worker.engine import runtime
from server import BentoServer, clean_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # No MODEL_NAMES at all: the service must serve the bundled model, offline. No ONNX_CACHE
    # either: the default cache, under the scratch XDG_CACHE_HOME rather than the user's.
    srv = BentoServer({"XDG_CACHE_HOME": SCRATCH_CACHE}, tmp_path_factory.mktemp("e2e") / "server.log",
                      unset=("MODEL_NAMES", "SERVED_MODEL_NAMES", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                             "ONNX_CACHE"))
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_model_path(), device="cpu")


def test_startup_logs_bundled_model_and_one_line_per_model(server):
    logs = server.logs()
    assert f"MODEL_NAMES is unset: serving the bundled {MINILM}" in logs
    # no configuration on a CPU: the lean engine in this CPU's precision (bf16 on AMX), the
    # model exported offline into the user's cache
    choice = runtime.for_this_cpu("auto")
    assert (f"model {MINILM}: source={bundled_model_path()} backend=optimum "
            f"dtype={choice.precision} device=cpu" in logs)
    assert f"runtime={choice.runtime} ({choice.reason}" in logs
    assert f"onnx={SCRATCH_CACHE}/infinity-embedding-worker/onnx/" in logs
    assert "capabilities=embed" in logs


def test_openai_client_base64_default_equals_float(oai, st_model):
    texts = ["Hello world", "OpenAI clients send base64 by default"]
    default = oai.embeddings.create(model=MINILM, input=texts)  # the client asks for base64
    floats = oai.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert_like(b, st_model.encode(texts, normalize_embeddings=True))
    assert default.model == MINILM and default.usage.total_tokens > 0


def test_openai_client_dimensions_and_extra_body(oai):
    result = oai.embeddings.create(model=MINILM, input="x", dimensions=64,
                                   extra_body={"modality": "text"})
    vector = np.array(result.data[0].embedding)
    assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_openai_client_gets_compact_vectors_through_extra_body(oai):
    texts = ["compact vectors", "for a vector database"]
    floats = np.array([d.embedding for d in oai.embeddings.create(
        model=MINILM, input=texts, encoding_format="float").data], dtype=np.float32)
    ints = oai.embeddings.create(model=MINILM, input=texts, encoding_format="float",
                                 extra_body={"output_dtype": "int8"})
    expected = np.clip(np.rint(floats * 127 * np.sqrt(384) / 4), -128, 127)
    np.testing.assert_array_equal(np.array([d.embedding for d in ints.data]), expected)
    # an explicit base64 is handed back as it came: the packed bits
    bits = oai.embeddings.create(model=MINILM, input=texts, encoding_format="base64",
                                 extra_body={"embedding_type": "ubinary"})
    packed = np.stack([np.frombuffer(base64.b64decode(d.embedding), np.uint8) for d in bits.data])
    np.testing.assert_array_equal(packed, np.packbits(floats > 0, axis=1))


def test_openai_client_models_list(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MINILM]
    assert models.data[0].model_extra["capabilities"] == ["embed", "late_chunking", "token_embed"]


def test_openai_client_typed_errors_carry_our_message(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert info.value.status_code == 404
    assert f"model 'text-embedding-3-small' is not served here; available models: {MINILM}" in str(info.value)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=MINILM, input=["ok", ""])
    assert "input[1]: empty string" in str(info.value)


def test_curl_style_raw_requests(server):
    # the seed README's curl bodies, as sent by curl -d (form content type)
    body = '{"model":"%s","input":"Hello world","modality":"text"}' % MINILM
    r = httpx.post(f"{server.url}/v1/embeddings", content=body,
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == MINILM
    assert httpx.get(f"{server.url}/livez").status_code == 200


def test_64_concurrent_mixed_requests_each_get_their_own_embeddings(server, st_model):
    sizes = [1 + (i * 7) % 24 for i in range(64)]
    requests = [[f"request {i} item {j}: " + "lorem ipsum " * ((i + j) % 9) for j in range(n)]
                for i, n in enumerate(sizes)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post("/v1/embeddings", json={"model": MINILM, "input": texts})
                for texts in requests
            ))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    flat = [t for texts in requests for t in texts]
    reference = dict(zip(flat, st_model.encode(flat, normalize_embeddings=True, batch_size=64)))
    for texts, response in zip(requests, responses):
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(len(texts)))
        for text, item in zip(texts, data):
            assert float(np.dot(reference[text], item["embedding"])) >= 0.9999


def _serve(env: dict[str, str], timeout: float):
    return subprocess.run([sys.executable, "-m", "bentoml", "serve", "service:InfinityEmbedding",
                           "--port", "0"], cwd=ROOT, env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("env, line", [
    ({"MODEL_NAMES": "a/b;c/d", "BATCH_SIZES": "1;2;3"},
     "configuration error: BATCH_SIZES='1;2;3': 3 entries, expected 1 or 2 (one per MODEL_NAMES entry)"),
    ({"MODEL_NAMES": "/no/such/dir"},
     "configuration error: MODEL_NAMES='/no/such/dir': '/no/such/dir' is not a directory"),
    ({"BACKEND": "onnx"},
     "configuration error: BACKEND='onnx': expected one of auto, torch, optimum, ctranslate2"),
])
def test_configuration_mistakes_stop_startup_with_one_line(env, line):
    result = _serve(env, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    (only,) = result.stderr.strip().splitlines()
    assert only.startswith(line)


def test_unloadable_model_stays_unready_with_the_reason(tmp_path):
    srv = BentoServer({"MODEL_NAMES": "nobody/no-such-model", "HF_HUB_OFFLINE": "1"},
                      tmp_path / "server.log").launch()
    try:
        deadline = time.monotonic() + 90
        while "model loading failed" not in srv.logs():
            assert time.monotonic() < deadline, srv.logs()
            time.sleep(0.5)
        assert httpx.get(f"{srv.url}/livez").status_code == 200
        assert httpx.get(f"{srv.url}/readyz").status_code == 503
        r = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "nobody/no-such-model", "input": "x"})
        assert r.status_code == 503
        assert r.json()["error"]["message"].startswith("models failed to load: ")
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory, tiny_models):
    srv = BentoServer({"MODEL_NAMES": str(tiny_models["clip"]), "SERVED_MODEL_NAMES": "tiny-clip",
                       "IMAGE_FETCH_ALLOW_PRIVATE": "true"},
                      tmp_path_factory.mktemp("clip") / "server.log")
    yield srv.start()
    srv.stop()


def test_openai_client_image_modality_with_private_opt_in(clip_server, image_host):
    client = openai.OpenAI(base_url=f"{clip_server.url}/v1", api_key="unused", max_retries=0)
    urls = [image_host.url("/red.png", host="127.0.0.1"), image_host.url("/blue.gif", host="localhost")]
    result = client.embeddings.create(model="tiny-clip", input=urls, extra_body={"modality": "image"})
    got = np.array([d.embedding for d in result.data])
    assert got.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    failures = "embedding_worker_image_fetch_failures_total"  # README: a refused image counts
    before = clip_server.metric(failures, model="tiny-clip")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tiny-clip", input=[urls[0], image_host.url("/missing", host="127.0.0.1")],
                                 extra_body={"modality": "image"})
    assert "input[1]: HTTP 404 from 127.0.0.1" in str(info.value)
    assert clip_server.metric(failures, model="tiny-clip") == before + 1
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tiny-clip", input="x", extra_body={"modality": "audio"})
    assert ("model 'tiny-clip' does not support audio embeddings; it supports: text embeddings, "
            "image embeddings") in str(info.value)
