"""RequestGuard (auth, body cap, request log line) around a small real ASGI app."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from embedding_worker.config import Settings
from embedding_worker.observability.logs import annotate
from embedding_worker.api.middleware import RequestGuard

KEYS = "first-key;second-key"


def app_with(**settings) -> tuple[TestClient, list[int]]:
    bodies: list[int] = []

    async def echo(request: Request):
        body = await request.body()
        bodies.append(len(body))
        annotate(model="m", items=2, tokens=7)
        return JSONResponse({"got": len(body)})

    async def ok(_: Request):
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/v1/embeddings", echo, methods=["POST"]),
                              *(Route(p, ok) for p in ("/livez", "/readyz", "/healthz", "/metrics",
                                                       "/docs"))])
    guarded = RequestGuard(inner, Settings(**settings))
    return TestClient(guarded), bodies


@pytest.fixture()
def guarded():
    return app_with(api_key=KEYS)[0]


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer first-key-and-more",
                                    "Basic first-key", "first-key", "Bearer "])
def test_requests_without_a_valid_key_get_401_envelope(guarded, header):
    headers = {"Authorization": header} if header else {}
    for method, path in [("POST", "/v1/embeddings"), ("GET", "/docs")]:
        r = guarded.request(method, path, headers=headers, json={})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": {
            "message": "missing or invalid API key; send the header `Authorization: Bearer <key>`",
            "type": "authentication_error", "param": None, "code": "invalid_api_key"}}


@pytest.mark.parametrize("key", ["first-key", "second-key"])
def test_each_configured_key_is_accepted(guarded, key):
    for scheme in ("Bearer", "bearer"):
        r = guarded.post("/v1/embeddings", headers={"Authorization": f"{scheme} {key}"}, content=b"{}")
        assert r.status_code == 200 and r.json() == {"got": 2}


def test_probes_and_metrics_are_open_and_metrics_can_require_the_key(guarded):
    for path in ("/livez", "/readyz", "/healthz", "/metrics"):
        assert guarded.get(path).status_code == 200, path
    strict, _ = app_with(api_key="k", metrics_require_auth=True)
    assert strict.get("/metrics").status_code == 401
    assert strict.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    assert strict.get("/readyz").status_code == 200


def test_no_key_configured_means_no_auth():
    client, _ = app_with()
    assert client.post("/v1/embeddings", content=b"{}").status_code == 200


def test_body_over_max_request_bytes_is_413_before_the_app_reads_it():
    client, bodies = app_with(max_request_bytes=1024)
    r = client.post("/v1/embeddings", content=b"x" * 1025)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == (
        "request body is 1025 bytes, at most 1024 (MAX_REQUEST_BYTES)")
    assert bodies == []  # refused on Content-Length alone
    assert client.post("/v1/embeddings", content=b"x" * 1024).status_code == 200


def test_chunked_body_over_the_cap_is_413():
    client, bodies = app_with(max_request_bytes=1024)

    def chunks():
        for _ in range(10):
            yield b"y" * 300

    r = client.post("/v1/embeddings", content=chunks())
    assert r.status_code == 413
    assert "more than" in r.json()["error"]["message"] and bodies == []


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_one_log_line_per_request_without_payload_or_key():
    client, _ = app_with(api_key=KEYS)
    logger, handler = logging.getLogger("embedding_worker"), Lines()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        client.post("/v1/embeddings", headers={"Authorization": "Bearer first-key"},
                    content=b'{"input": "very secret text"}')
        client.post("/v1/embeddings", content=b"{}")
        client.get("/livez")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [line for line in handler.lines if line.startswith("request ")]
    assert len(lines) == 2, lines  # probes are not logged
    import orjson

    first, second = (orjson.loads(line.removeprefix("request ")) for line in lines)
    assert first.keys() == {"method", "route", "model", "items", "tokens", "status", "latency_ms"}
    assert (first["route"], first["model"], first["items"], first["tokens"], first["status"]) == (
        "/v1/embeddings", "m", 2, 7, 200)
    assert second["status"] == 401 and "model" not in second
    text = "\n".join(lines)
    assert "secret" not in text and "first-key" not in text


@pytest.mark.parametrize("configured", ["secret;", ";secret", "secret,,other"])
def test_a_stray_separator_in_api_key_never_admits_an_empty_token(configured):
    client, _ = app_with(api_key=configured)
    for header in ("Bearer", "Bearer ", "bearer   "):
        assert client.post("/v1/embeddings", headers={"Authorization": header}).status_code == 401
    assert client.post("/v1/embeddings", headers={"Authorization": "Bearer secret"}).status_code == 200


@pytest.mark.parametrize("path, shape", [("/embed", "tei"), ("/tei/some/model/predict", "tei"),
                                         ("/v2/embed", "openai"), ("/rerank", "openai")])
def test_guard_errors_take_the_routes_dialect(guarded, path, shape):
    """A TEI route's 401 is TEI's body (huggingface_hub shows `error`); Cohere's SDK reads
    the OpenAI envelope. `/rerank` is both, and the guard has not read the body: OpenAI's."""
    r = guarded.post(path, json={})
    assert r.status_code == 401
    if shape == "tei":
        assert r.json() == {"error": "missing or invalid API key; send the header "
                                     "`Authorization: Bearer <key>`", "error_type": "Unauthorized"}
    else:
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_a_path_with_a_control_character_gets_the_envelope(guarded):
    r = guarded.post("/tei/a%0Ab/predict", json={}, headers={"Authorization": "Bearer first-key"})
    assert r.status_code == 404
    assert r.json() == {"error": "no route POST '/tei/a\\nb/predict'", "error_type": "Validation"}
