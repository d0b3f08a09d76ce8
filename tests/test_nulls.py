"""An optional field sent as JSON `null` is the field left out, in every dialect.

The walk goes over the route table itself: for every operation with a body, every field its
request model declares (and each alias) is sent as `null` beside a valid body, and the answer
(status and body) must equal the answer to the same body without that field. A field the base
body leaves out must then also be answered 200: two equal errors would prove nothing. TEI's
nested `parameters`, RunPod job bodies and the batch items are walked the same way.

The HTTP app is the real one (`create_app`) over a real core with the bundled MiniLM and tiny
generated models, one of each kind, in this test's event loop.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import httpx
import pytest
from pydantic import AliasChoices

from conftest import MINILM, running
from embedding_worker.api.http import create_app
from embedding_worker.api.routes import ROUTES
from embedding_worker.config import bundled_model_path
from embedding_worker.core.schemas import EmbedItem, RerankItem
from imagehost import image_bytes
from models import make_tiny_classifier, make_tiny_splade

IMAGE = "data:image/png;base64," + base64.b64encode(image_bytes("PNG", "red")).decode()
TEXTS = ["The cat sat on the mat.", "Tides follow the moon."]

# a valid body per route (path: body); what the walk adds nulls to
BODIES: dict[str, dict[str, Any]] = {
    "/v1/embeddings": {"model": MINILM, "input": TEXTS},
    "/v1/rerank": {"model": "tiny-rerank", "query": "q", "documents": TEXTS},
    "/v1/classify": {"model": "tiny-classify", "input": TEXTS},
    "/v1/tokenize": {"model": MINILM, "input": TEXTS},
    "/embeddings": {"model": MINILM, "input": TEXTS},
    "/rerank": {"model": "tiny-rerank", "query": "q", "documents": TEXTS},
    "/classify": {"model": "tiny-classify", "input": TEXTS},
    "/embeddings_image": {"model": "tiny-clip", "input": [IMAGE]},
    "/embeddings_audio": {"model": "tiny-clip", "input": [IMAGE]},  # a 400 either way (CLIP)
    "/v2/embed": {"model": MINILM, "texts": TEXTS, "input_type": "search_query"},
    "/v1/embed": {"texts": TEXTS},
    "/embed": {"inputs": TEXTS},
    "/embed_sparse": {"inputs": TEXTS, "model": "tiny-splade"},
    "/embed_all": {"inputs": TEXTS},
    "/predict": {"inputs": TEXTS, "model": "tiny-classify"},
    "/tokenize": {"inputs": TEXTS},
    "/decode": {"ids": [[101, 7592, 102]]},
    "/similarity": {"inputs": {"source_sentence": "a cat", "sentences": TEXTS}},
    "/": {"inputs": TEXTS},
}
# bodies of another shape on the same route
TEI_RERANK = {"query": "q", "texts": TEXTS}
NOT_200 = {"/embeddings_audio"}  # no audio model here: the walk compares the 400s


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return make_tiny_classifier(tmp_path_factory.mktemp("nulls") / "tiny-classify")


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    return make_tiny_splade(tmp_path_factory.mktemp("nulls") / "tiny-splade")


@pytest.fixture(scope="module")
async def http(tiny_models, classifier, splade):
    sources = [bundled_model_path(), tiny_models["rerank"], classifier, tiny_models["clip"], splade]
    async with running(model_names=";".join(map(str, sources)),
                       served_model_names=f"{MINILM};tiny-rerank;tiny-classify;tiny-clip;tiny-splade",
                       batch_sizes="8") as core:
        transport = httpx.ASGITransport(app=create_app(core))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def field_names(model: type) -> list[str]:
    """Every key a request model reads: its fields and their aliases."""
    names = []
    for name, field in model.model_fields.items():
        names.append(name)
        if isinstance(field.validation_alias, AliasChoices):
            names += [c for c in field.validation_alias.choices if isinstance(c, str)]
    return list(dict.fromkeys(names))


def close(a: Any, b: Any) -> bool:
    """Equal JSON, floats to 1e-6 (one request's vectors, computed twice)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b


async def answer(http: httpx.AsyncClient, path: str, body: Any) -> tuple[int, Any]:
    response = await http.post(path, json=body)
    payload = response.json()
    if isinstance(payload, dict):  # a new id and clock per answer
        payload = {k: v for k, v in payload.items() if k not in ("id", "created")}
        if isinstance(payload.get("output"), dict):
            payload["output"] = {k: v for k, v in payload["output"].items()
                                 if k not in ("id", "created")}
    return response.status_code, payload


async def check_walk(http, path: str, base: dict[str, Any], fields: list[str],
                     nest: str | None = None) -> list[str]:
    """Each of `fields` as null beside `base` (inside `base[nest]` when given): the answer to the
    body without that field. Returns the fields walked."""
    for name in fields:
        inner = base[nest] if nest else base
        without = {k: v for k, v in inner.items() if k != name}
        nulled = {**without, name: None}
        if nest:
            without, nulled = {**base, nest: without}, {**base, nest: nulled}
        expected = await answer(http, path, without)
        got = await answer(http, path, nulled)
        assert got[0] == expected[0] and close(got[1], expected[1]), (path, name, got, expected)
        if name not in inner and path not in NOT_200:
            assert got[0] == 200, (path, name, got)
    return fields


def test_every_route_with_a_body_is_walked():
    posted = {path for route in ROUTES if route.request is not None for path in route.paths}
    aliases = {path for route in ROUTES for path in route.paths[1:]}  # the same operation
    assert posted - aliases == set(BODIES)


async def test_null_fields_are_absent_fields_on_every_route(http):
    walked = 0
    for route in ROUTES:
        if route.request is None:
            continue
        path = route.paths[0]
        walked += len(await check_walk(http, path, BODIES[path], field_names(route.request)))
    from embedding_worker.core.dialects.tei import TeiRerankRequest

    walked += len(await check_walk(http, "/rerank", TEI_RERANK, field_names(TeiRerankRequest)))
    assert walked > 60


async def test_tei_parameters_and_per_model_routes(http):
    """huggingface_hub nests options in `parameters`; /tei/<model>/ serves the same bodies."""
    for path, extra in (("/embed", {}), ("/predict", {"model": "tiny-classify"})):
        model = next(r.request for r in ROUTES if r.paths[0] == path)
        body = {"inputs": TEXTS, "parameters": {"truncate": True}, **extra}
        await check_walk(http, path, body, field_names(model), nest="parameters")
    predict = next(r.request for r in ROUTES if r.paths[0] == "/predict")
    await check_walk(http, "/tei/tiny-classify/predict", {"inputs": TEXTS}, field_names(predict))


async def test_runpod_job_bodies(http):
    """A job's own keys and the bodies inside it: null is absent there too."""
    embed, rerank = BODIES["/v1/embeddings"], BODIES["/v1/rerank"]
    for job in (embed, rerank):
        kind = "/v1/embeddings" if job is embed else "/v1/rerank"
        model = next(r.request for r in ROUTES if r.paths[0] == kind)
        await check_walk(http, "/runsync", {"input": job}, field_names(model), nest="input")
        await check_walk(http, "/runsync", {"input": {"openai_route": kind, "openai_input": job}},
                         ["route", "body", "query", "input", "openai_input"], nest="input")
    routed = {"input": {"route": "/v2/embed", "body": BODIES["/v2/embed"]}}
    await check_walk(http, "/runsync", routed, ["openai_route", "openai_input"], nest="input")
    ok = await answer(http, "/runsync", {"input": {**embed, "query": None}})
    assert ok[1]["status"] == "COMPLETED" and ok[1]["output"]["object"] == "list"


def test_batch_items():
    """The batchable methods' items (BentoML validates them with these models)."""
    assert EmbedItem.model_validate({"model": "m", "text": "t", "prompt_name": None}) == \
        EmbedItem.model_validate({"model": "m", "text": "t"})
    with pytest.raises(ValueError, match="Field required"):
        RerankItem.model_validate({"model": "m", "query": None, "document": "d"})


async def test_similarity_bodies(http):
    """TEI's sentence similarity, on its route and on `POST /`."""
    from embedding_worker.core.dialects.tei import TeiSimilarityRequest

    body = {"inputs": {"source_sentence": "a cat", "sentences": TEXTS}}
    for path in ("/similarity", "/"):
        await check_walk(http, path, body, field_names(TeiSimilarityRequest))
        await check_walk(http, path, body, ["source_sentence", "sentences"], nest="inputs")
