"""Infinity's own server API (`infinity_emb v2`, 0.0.77/0.0.78) at its unprefixed paths:
`GET /models`, `POST /embeddings`, `/rerank`, `/classify`, `/embeddings_image`,
`/embeddings_audio`, and `GET /health` (TEI's too). People who move from Infinity keep its clients
(`infinity-client`, LiteLLM's `infinity/` provider, LangChain's Infinity integrations).

Its bodies are OpenAI's and Cohere's, read by the same families; what differs is translated here:
- `model` may be left out or sent as Infinity's placeholder `default/not-specified` (its
  generated client's default): the first served model that can do the work takes it;
- `dimensions: 0` (that client's default) is the full size;
- responses carry `id` and `created`; model cards are `owned_by: "infinity"`; a rerank result's
  `document` is the text itself (`null` unless asked for), where `/v1/rerank` answers Cohere's
  and Jina's `{"text": ...}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field

from ..classify import Classify
from ..embed import Embeddings
from ..models import Models
from ..rerank import Rerank
from ..schemas import (
    ClassifyRequest,
    EmbeddingData,
    EmbeddingRequest,
    ModelCard,
    RerankRequest,
    ResponseBody,
    Usage,
)

# what Infinity's request models (and so its generated client) put in `model` when none is given
NOT_SPECIFIED = "default/not-specified"
MODALITY_CAPABILITY = {"text": "embed", "image": "image_embed", "audio": "audio_embed"}


class Infinity:
    def __init__(self, models: Models, embeddings: Embeddings, rerank: Rerank,
                 classify: Classify):
        self.models = models
        self.embeddings_family = embeddings
        self.rerank_family = rerank
        self.classify_family = classify

    def _named(self, body: Any, capability: str) -> Any:
        """The body with its model named: a missing or placeholder `model` is the first served
        model with `capability`."""
        if not isinstance(body, dict) or body.get("model", NOT_SPECIFIED) != NOT_SPECIFIED:
            return body
        return {**body, "model": self.models.default(capability)}

    async def list_models(self, _body: Any = None) -> dict[str, Any]:
        listed = await self.models.list()
        for card in listed["data"]:
            card["owned_by"] = "infinity"
        return listed

    async def embeddings(self, body: Any) -> dict[str, Any]:
        if isinstance(body, dict) and body.get("dimensions") == 0:
            body = {k: v for k, v in body.items() if k != "dimensions"}
        modality = str(body.get("modality", "text")).lower() if isinstance(body, dict) else ""
        # an unknown modality: the family names it
        capability = MODALITY_CAPABILITY.get(modality, "embed")
        result = await self.embeddings_family.create(self._named(body, capability))
        return _stamped(result)

    async def embeddings_image(self, body: Any) -> dict[str, Any]:
        return await self.embeddings(_with_modality(body, "image"))

    async def embeddings_audio(self, body: Any) -> dict[str, Any]:
        return await self.embeddings(_with_modality(body, "audio"))

    async def rerank(self, body: Any) -> dict[str, Any]:
        """The family's answer in Infinity's shape: each document as its text (null unless
        asked for), no Cohere `meta`."""
        done = await self.rerank_family.create(self._named(body, "rerank"))
        results = [{"relevance_score": r["relevance_score"], "index": r["index"],
                    "document": r["document"]["text"] if "document" in r else None}
                   for r in done["results"]]
        return _stamped({"object": "rerank", "model": done["model"], "results": results,
                         "usage": done["usage"]})

    async def classify(self, body: Any) -> dict[str, Any]:
        return await self.classify_family.create(self._named(body, "classify"))


def _with_modality(body: Any, modality: str) -> Any:
    return {**body, "modality": modality} if isinstance(body, dict) else body


def _stamped(body: dict[str, Any]) -> dict[str, Any]:
    """Infinity's `id` and `created` on a response."""
    return {**body, "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())}


def health() -> dict[str, float]:
    """`GET /health`: Infinity's body; TEI's clients read the status alone."""
    return {"unix": time.time()}


# --- requests and responses, as the OpenAPI document states them (the bodies themselves are
# read by the families' models after `Infinity` has translated them) ---


class InfinityEmbeddingRequest(EmbeddingRequest):
    model: str = Field(NOT_SPECIFIED, min_length=1, description=(
        "a served model; default: the first served model that embeds the modality"))
    dimensions: int | None = Field(None, ge=0, description="0: the full size (Infinity's)")


class InfinityImageRequest(InfinityEmbeddingRequest):
    """`/embeddings_image` and `/embeddings_audio`: `modality` is the route's."""


class InfinityRerankRequest(RerankRequest):
    model: str = Field(NOT_SPECIFIED, min_length=1, description=(
        "a served model; default: the first served reranker"))


class InfinityClassifyRequest(ClassifyRequest):
    model: str = Field(NOT_SPECIFIED, min_length=1, description=(
        "a served model; default: the first served classifier"))


class InfinityEmbeddingResponse(ResponseBody):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: Usage
    id: str
    created: int
    prompt_name: str | None = None
    warnings: list[str] | None = None


class InfinityRerankResult(ResponseBody):
    relevance_score: float
    index: int
    document: str | None


class InfinityRerankResponse(ResponseBody):
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[InfinityRerankResult]
    usage: Usage
    id: str
    created: int


class InfinityModelCard(ModelCard):
    owned_by: Literal["infinity"]  # type: ignore[assignment]


class InfinityModelList(ResponseBody):
    object: Literal["list"] = "list"
    data: list[InfinityModelCard]


class Health(ResponseBody):
    unix: float = Field(description="the server's clock, seconds since the epoch")
