"""The RunPod handler in-process, and parity with the HTTP routes for the same payloads."""

import base64
import copy
import json
import time

import numpy as np
import pytest

from conftest import MINILM
from embedding_worker.config import Settings
from embedding_worker.core.core import Core
from embedding_worker.api.runpod import make_handler

DOCS = ["Product A comes with a 2-year warranty", "Product B is available in red and blue colors",
        "All electronics include a standard 1-year warranty"]
QUERY = "Which product has warranty coverage?"


@pytest.fixture(scope="session")
async def handler(served_env):
    """A separate core in the test loop (infinity binds to the loop that starts it)."""
    core = Core(Settings(**{k.lower(): v for k, v in served_env.items()}))
    await core.start()
    yield make_handler(core)
    await core.stop()


async def run(handler, job_input):
    output = await handler({"id": "job-1", "input": job_input})
    assert json.loads(json.dumps(output)) == output  # what the SDK will post, exactly
    return output


def png_data_uri(color):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def test_seed_list_models(handler):
    for job_input in ({"openai_route": "/v1/models"}, {"openai_route": "/v1/models", "openai_input": {}},
                      {"openai_route": "/v1/models", "openai_input": None}):
        output = await run(handler, job_input)
        assert [m["id"] for m in output["data"]] == [MINILM, "tiny-embed", "tiny-rerank", "tiny-clip"]


async def test_seed_text_embeddings_standard_and_openai(handler):
    from sentence_transformers import SentenceTransformer

    from embedding_worker.config import bundled_model_path

    expected = SentenceTransformer(bundled_model_path(), device="cpu").encode(["Hello world"])[0]
    standard = await run(handler, {"model": MINILM, "input": "Hello world", "modality": "text"})
    proxied = await run(handler, {"openai_route": "/v1/embeddings",
                                  "openai_input": {"model": MINILM, "input": "Hello world", "modality": "text"}})
    for output in (standard, proxied):
        assert output["object"] == "list" and output["model"] == MINILM
        np.testing.assert_allclose(output["data"][0]["embedding"], expected, atol=1e-4)
        assert output["usage"]["total_tokens"] == 2


async def test_openai_client_base64_through_the_proxy(handler):
    output = await run(handler, {"openai_route": "/v1/embeddings",
                                 "openai_input": {"model": MINILM, "input": ["a", "b"], "encoding_format": "base64"}})
    vector = np.frombuffer(base64.b64decode(output["data"][1]["embedding"]), "<f4")
    assert vector.shape == (384,)


async def test_seed_image_embeddings_base64(handler):
    output = await run(handler, {"model": "tiny-clip", "input": png_data_uri("red"), "modality": "image"})
    bare = await run(handler, {"model": "tiny-clip", "modality": "image",
                               "input": [png_data_uri("red").split(",", 1)[1], png_data_uri("blue")]})
    np.testing.assert_allclose(output["data"][0]["embedding"], bare["data"][0]["embedding"], atol=1e-6)
    assert not np.allclose(bare["data"][0]["embedding"], bare["data"][1]["embedding"])


async def test_seed_rerank_standard_and_openai(handler):
    standard = await run(handler, {"model": "tiny-rerank", "query": QUERY, "docs": DOCS, "return_docs": True})
    proxied = await run(handler, {"openai_route": "/v1/rerank",
                                  "openai_input": {"model": "tiny-rerank", "query": QUERY, "docs": DOCS,
                                                   "return_docs": True}})
    for output in (standard, proxied):
        assert output["object"] == "rerank"
        assert sorted(r["index"] for r in output["results"]) == [0, 1, 2]
        assert all(r["document"]["text"] == DOCS[r["index"]] for r in output["results"])
        scores = [r["relevance_score"] for r in output["results"]]
        assert scores == sorted(scores, reverse=True)
    assert standard["results"] == proxied["results"]


@pytest.mark.parametrize("job_input, message", [
    ({"model": "nope", "input": "x"}, "model 'nope' is not served here"),
    ({"model": MINILM, "input": ["ok", ""]}, "input[1]: empty string"),
    ({"model": MINILM, "input": "x", "modality": "audio"}, f"model '{MINILM}' does not support audio embeddings"),
    ({"openai_route": "/v1/chat/completions", "openai_input": {}}, "openai_route '/v1/chat/completions' is not supported"),
    ({"openai_route": "/v1/embeddings"}, "model: field required"),
    ({"prompt": "hello"}, 'unrecognised job input; expected {"route"'),
    (None, "job input must be a JSON object"),
    ("just a string", "job input must be a JSON object"),
])
async def test_errors_fail_the_job_with_a_readable_string(handler, job_input, message):
    output = await run(handler, job_input)
    assert set(output) == {"error"} and isinstance(output["error"], str)
    assert output["error"].startswith(message) or message in output["error"]


# --- parity: the same payload through HTTP and through the handler ---

PAYLOADS = [
    ("/v1/embeddings", {"model": MINILM, "input": ["Hello world", "second"]}),
    ("/v1/embeddings", {"model": "tiny-embed", "input": "x", "dimensions": 8, "encoding_format": "base64"}),
    ("/v1/embeddings", {"model": "tiny-clip", "input": [png_data_uri("green")], "modality": "image"}),
    ("/v1/rerank", {"model": "tiny-rerank", "query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True}),
    ("/v1/rerank", {"model": "tiny-rerank", "query": QUERY, "docs": DOCS, "raw_scores": True}),
    ("/v1/models", None),
    ("/v1/tokenize", {"model": MINILM, "input": ["Hello", "world"], "prompt_name": "query"}),
    ("/v1/embeddings", {"model": "nope", "input": "x"}),
    ("/v1/embeddings", {"model": MINILM, "input": [1, 2, 3]}),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "dimensions": 999}),
    ("/v1/rerank", {"model": MINILM, "query": "q", "docs": ["a"]}),
    ("/v1/embeddings", {"model": "tiny-clip", "input": ["data:image/png;base64,AAAA"], "modality": "image"}),
    # retrieval options
    ("/v1/embeddings", {"model": MINILM, "input": ["a", "b"], "output_dtype": "int8"}),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "embedding_type": "ubinary", "encoding_format": "base64"}),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "input_type": "search_query", "dimensions": 64}),
    ("/v1/embeddings", {"model": MINILM, "input": "word " * 300, "truncate": "START"}),
    ("/v1/embeddings", {"model": MINILM, "input": "word " * 300, "truncate": "NONE"}),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "prompt_name": "query"}),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "prompt_name": "nope"}),
    ("/v1/embeddings", {"model": "tiny-embed", "input": "x", "task": "retrieval.query"}),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "output_dtype": "int4"}),
    ("/v1/embeddings", {"model": MINILM, "input": "x", "dimensions": 60, "output_dtype": "binary"}),
]


def comparable(payload):
    payload = copy.deepcopy(payload)
    payload.pop("id", None)  # rerank ids are per response
    for card in payload.get("data", []) if payload.get("object") == "list" else []:
        if isinstance(card, dict):
            card.pop("stats", None)
            card.pop("created", None)
    return payload


def assert_same(a, b):
    a, b = comparable(a), comparable(b)
    if a.get("object") == "list" and a.get("data") and "embedding" in a["data"][0]:
        ea = [d.pop("embedding") for d in a["data"]]
        eb = [d.pop("embedding") for d in b["data"]]
        if isinstance(ea[0], str):
            ea = [np.frombuffer(base64.b64decode(e), "<f4") for e in ea]
            eb = [np.frombuffer(base64.b64decode(e), "<f4") for e in eb]
        np.testing.assert_allclose(np.array(ea), np.array(eb), atol=1e-5)
    if a.get("object") == "rerank":
        sa = [r.pop("relevance_score") for r in a["results"]]
        sb = [r.pop("relevance_score") for r in b["results"]]
        np.testing.assert_allclose(sa, sb, atol=1e-5)
    assert a == b


@pytest.mark.parametrize("route, body", PAYLOADS)
async def test_http_and_runpod_give_the_same_result(client, handler, route, body):
    http = client.get(route) if body is None else client.post(route, json=body)
    job = await run(handler, {"openai_route": route, "openai_input": body})
    runsync = client.post("/runsync", json={"input": {"openai_route": route, "openai_input": body}}).json()
    if http.status_code == 200:
        assert_same(http.json(), job)
        assert runsync["status"] == "COMPLETED" and runsync["id"].startswith("sync-")
        assert_same(runsync["output"], job)
    else:
        message = http.json()["error"]["message"]
        assert job == {"error": message}
        assert runsync["status"] == "FAILED" and runsync["error"] == message
    if route in ("/v1/embeddings", "/v1/rerank"):
        plain = await run(handler, body)  # the Standard flavour: the body itself as input
        if "error" in job:
            assert plain == job
        else:
            assert_same(plain, job)


def test_runsync_seed_examples_over_http(client):
    out = client.post("/runsync", json={"input": {"openai_route": "/v1/models"}}).json()
    assert out["status"] == "COMPLETED" and out["output"]["data"][0]["id"] == MINILM
    out = client.post("/runsync", json={"input": {"model": MINILM, "input": "Hello world", "modality": "text"}}).json()
    assert len(out["output"]["data"][0]["embedding"]) == 384
    out = client.post("/runsync", json={"input": {"model": "tiny-rerank", "query": QUERY, "docs": DOCS, "return_docs": True}}).json()
    assert {r["document"]["text"] for r in out["output"]["results"]} == set(DOCS)
    bad = client.post("/runsync", json={"nope": 1})
    assert bad.status_code == 400 and 'expected a JSON object {"input": {...}}' in bad.json()["error"]["message"]


def test_openai_proxy_paths_over_http(client):
    assert client.get("/openai/v1/models").json()["data"][0]["id"] == MINILM
    r = client.post("/openai/v1/embeddings", json={"model": MINILM, "input": "x"})
    assert r.status_code == 200
    r = client.post("/openai/v1/rerank", json={"model": "tiny-rerank", "query": "q", "docs": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


async def test_each_job_logs_one_structured_line(handler):
    import logging

    import orjson

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, collect = logging.getLogger("embedding_worker"), Collect(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(collect)
    try:
        await run(handler, {"model": MINILM, "input": ["secret words", "more"]})
        await run(handler, {"openai_route": "/v1/embeddings", "openai_input": {"model": "nope", "input": "x"}})
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    ok, missing = (orjson.loads(line.removeprefix("request ")) for line in lines
                   if line.startswith("request "))
    assert (ok["route"], ok["model"], ok["items"], ok["status"]) == ("job", MINILM, 2, 200)
    assert ok["tokens"] > 0 and ok["latency_ms"] > 0
    assert (missing["route"], missing["status"]) == ("/v1/embeddings", 404)
    assert not any("secret" in line for line in lines)


# --- every dialect's route as a job: {"route", "body"} ---

ROUTE_JOBS = [
    ("/v2/embed", {"model": MINILM, "texts": ["a", "b"], "input_type": "search_query",
                   "embedding_types": ["float", "int8", "binary"]}),
    ("/v1/embed", {"texts": ["a"]}),
    ("/embed", {"inputs": ["a", "b"], "truncate": True}),
    ("/rerank", {"query": QUERY, "texts": DOCS, "return_text": True}),
    ("/tokenize", {"inputs": "Hello world"}),
    ("/decode", {"ids": [101, 7592, 102]}),
    ("/v1/tokenize", {"model": MINILM, "input": ["Hello", "world"]}),
    ("/tei/tiny-embed/embed", {"inputs": "x"}),
    ("/v1/embeddings", {"model": "tiny-clip", "input": [{"text": "a"}, {"image": png_data_uri("red")}]}),
    ("/info", None),
    ("/embed", {"inputs": []}),
    ("/v2/embed", {"texts": ["a"]}),
    ("/predict", {"inputs": "x"}),
]


def close(a, b) -> bool:
    """Equal JSON but for floats (within 1e-5) and per-response ids."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) - {"id", "created"}
        return keys == set(b) - {"id", "created"} and all(close(a[k], b[k]) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= 1e-5
    return a == b


@pytest.mark.parametrize("route, body", ROUTE_JOBS)
async def test_every_route_runs_as_a_job(client, handler, route, body):
    http = client.get(route) if body is None else client.post(route, json=body)
    job_input = {"route": route} if body is None else {"route": route, "body": body}
    job = await run(handler, job_input)
    runsync = client.post("/runsync", json={"input": job_input}).json()
    if http.status_code == 200:
        assert close(http.json(), job), (http.json(), job)
        assert runsync["status"] == "COMPLETED" and close(runsync["output"], job)
    else:
        error = http.json()["error"]
        message = error if isinstance(error, str) else error["message"]  # TEI's or OpenAI's
        assert job == {"error": message}
        assert runsync["status"] == "FAILED" and runsync["error"] == message


def test_the_sdks_cpu_name_comes_without_a_subprocess(monkeypatch):
    """runpod's debugger module asks py-cpuinfo for the CPU's name at import, which runs a second
    Python (1.2 s of a start); the handler hands it /proc/cpuinfo's name first."""
    import cpuinfo

    from embedding_worker.api.runpod import cpu_name_without_a_subprocess

    monkeypatch.setattr(cpuinfo, "get_cpu_info", cpuinfo.get_cpu_info)  # restored afterwards
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
             if line.startswith("model name")]
    cpu_name_without_a_subprocess()
    started = time.perf_counter()
    assert cpuinfo.get_cpu_info() == {"brand_raw": names[0]}
    assert time.perf_counter() - started < 0.01
