"""Every route of every dialect, in one table: HTTP registers it, RunPod jobs dispatch by it
(`{"route": path, "body": {...}}`), and error bodies take its dialect's shape.

TEI's routes also answer under `/tei/<served name>`, a base URL per model (TEI serves one model
and its bodies name none; at the root they take the first model that can do the work).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..core.core import Core
from ..core.dialects import cohere, infinity, tei
from ..core.errors import APIError
from ..core.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingOutputsResponse,
    ModelList,
    RerankRequest,
    RerankResponse,
    TokenizeRequest,
    TokenizeResponse,
    without_nulls,
)

# body, model named by the path (TEI's per-model prefix) or None
Operation = Callable[[Any, str | None], Awaitable[Any]]
TEI_PREFIX = "/tei/"


@dataclass(frozen=True)
class Route:
    paths: tuple[str, ...]  # the first is in the OpenAPI document, the others are aliases
    operation: Callable[[Core], Operation]
    request: type | None  # the body's model; None for a GET
    response: Any
    dialect: str = "openai"
    per_model: bool = False  # TEI's: also under /tei/<served name>

    @property
    def method(self) -> str:
        return "GET" if self.request is None else "POST"

    def bind(self, core: Core) -> Operation:
        """The route's operation on `core`. A body's null members count as absent before
        anything reads it (the routes that tell dialects apart by a body's keys too)."""
        run = self.operation(core)
        return lambda body, model: run(without_nulls(body), model)


def _plain(get: Callable[[Core], Callable[[Any], Awaitable[Any]]]) -> Callable[[Core], Operation]:
    """An operation whose route names no model."""
    return lambda core: (lambda body, _model: get(core)(body))


def is_tei_rerank(body: Any) -> bool:
    return isinstance(body, dict) and "texts" in body and "documents" not in body


def _rerank(core: Core) -> Operation:
    """`/rerank` is Infinity's route and TEI's: TEI's body (`texts`) gets TEI's answer, and TEI's
    error body."""

    async def run(body: Any, model: str | None) -> Any:
        if not is_tei_rerank(body):
            return await core.infinity.rerank(body)
        try:
            return await core.tei.rerank(body, model)
        except APIError as exc:
            exc.shape = "tei"
            raise

    return run


def _health(core: Core) -> Operation:
    async def run(_body: Any, model: str | None) -> dict[str, Any]:
        core.models.get(model or core.models.names[0])  # 503 with the reason unless ready
        return infinity.health()

    return run


ROUTES = (
    # OpenAI, with Jina's and Cohere's fields; /openai/v1/...: RunPod's OpenAI proxy path
    Route(("/v1/embeddings", "/openai/v1/embeddings"), _plain(lambda c: c.embeddings.create),
          EmbeddingRequest, EmbeddingResponse | EmbeddingOutputsResponse),
    Route(("/v1/rerank", "/v2/rerank", "/openai/v1/rerank"), _plain(lambda c: c.rerank.create),
          RerankRequest, RerankResponse),
    Route(("/v1/models", "/openai/v1/models"), _plain(lambda c: c.models.list), None, ModelList),
    Route(("/v1/classify",), _plain(lambda c: c.classify.create), ClassifyRequest,
          ClassifyResponse),
    Route(("/v1/tokenize",), _plain(lambda c: c.tokenize.create), TokenizeRequest,
          TokenizeResponse),
    # Infinity's own API (infinity_emb v2), at its unprefixed paths
    Route(("/embeddings",), _plain(lambda c: c.infinity.embeddings),
          infinity.InfinityEmbeddingRequest, infinity.InfinityEmbeddingResponse, "infinity"),
    Route(("/rerank",), _rerank, infinity.InfinityRerankRequest,
          infinity.InfinityRerankResponse | list[tei.TeiRank], "infinity", per_model=True),
    Route(("/models",), _plain(lambda c: c.infinity.list_models), None, infinity.InfinityModelList,
          "infinity"),
    Route(("/classify",), _plain(lambda c: c.infinity.classify), infinity.InfinityClassifyRequest,
          ClassifyResponse, "infinity"),
    Route(("/embeddings_image",), _plain(lambda c: c.infinity.embeddings_image),
          infinity.InfinityImageRequest, infinity.InfinityEmbeddingResponse, "infinity"),
    Route(("/embeddings_audio",), _plain(lambda c: c.infinity.embeddings_audio),
          infinity.InfinityImageRequest, infinity.InfinityEmbeddingResponse, "infinity"),
    # Cohere
    Route(("/v2/embed",), _plain(lambda c: c.cohere.v2), cohere.CohereEmbedRequest,
          cohere.CohereEmbedByTypeResponse, "cohere"),
    Route(("/v1/embed",), _plain(lambda c: c.cohere.v1), cohere.CohereEmbedRequest,
          cohere.CohereEmbedByTypeResponse | cohere.CohereEmbedFloatsResponse, "cohere"),
    # text-embeddings-inference (/health is Infinity's too)
    Route(("/embed",), lambda c: c.tei.embed, tei.TeiEmbedRequest, list[list[float]], "tei", True),
    Route(("/embed_sparse",), lambda c: c.tei.embed_sparse, tei.TeiTextsRequest,
          list[list[tei.TeiSparseValue]], "tei", True),
    Route(("/embed_all",), lambda c: c.tei.embed_all, tei.TeiTextsRequest,
          list[list[list[float]]], "tei", True),
    Route(("/predict",), lambda c: c.tei.predict, tei.TeiPredictRequest,
          list[tei.TeiLabel] | list[list[tei.TeiLabel]], "tei", True),
    Route(("/tokenize",), lambda c: c.tei.tokenize, tei.TeiTokenizeRequest,
          list[list[tei.TeiToken]], "tei", True),
    Route(("/decode",), lambda c: c.tei.decode, tei.TeiDecodeRequest, list[str], "tei", True),
    Route(("/info",), lambda c: c.tei.info, None, tei.TeiInfo, "tei", True),
    Route(("/health",), _health, None, infinity.Health, "tei", True),
    Route(("/similarity",), lambda c: c.tei.similarity, tei.TeiSimilarityRequest, list[float],
          "tei", True),
    Route(("/",), lambda c: c.tei.root, tei.TeiEmbedRequest,
          list[list[float]] | list[float] | list[tei.TeiRank] | list[list[tei.TeiLabel]], "tei",
          True),
)
TEI_ROUTES = {f"{TEI_PREFIX}{{model:path}}{path.rstrip('/')}": route
              for route in ROUTES if route.per_model for path in route.paths}


def dialect_of(path: str) -> str:
    """Whose error body a path gets (before its body is read)."""
    if path.startswith(TEI_PREFIX):
        return "tei"
    for route in ROUTES:
        if path in route.paths:
            return route.dialect
    return "openai"


def find(core: Core, method: str, path: str) -> tuple[Route, str | None] | None:
    """The route for `method path` and the model its path names (RunPod jobs' `route`)."""
    path = path.rstrip("/") or "/"
    for route in ROUTES:
        if path in route.paths and route.method == method:
            return route, None
    if path.startswith(TEI_PREFIX):
        rest = path[len(TEI_PREFIX):]
        for name in sorted(core.models.names, key=len, reverse=True):
            if rest == name or rest.startswith(name + "/"):
                tail = rest[len(name):] or "/"
                for route in ROUTES:
                    if route.per_model and tail in route.paths and route.method == method:
                        return route, name
    return None


# what a job's `openai_route` may name: the table's OpenAI routes, by their /v1 path
OPENAI_PATHS = tuple(route.paths[0] for route in ROUTES
                     if route.dialect == "openai" and route.paths[0].startswith("/v1/"))


def openai_route(path: str) -> Route | None:
    """The OpenAI route a job's `openai_route` names: `/v1/x`, `/openai/v1/x` or `/x`."""
    path = "/v1" + path.rstrip("/").removeprefix("/openai").removeprefix("/v1")
    return next((route for route in ROUTES if route.dialect == "openai" and path in route.paths
                 and path in OPENAI_PATHS), None)
