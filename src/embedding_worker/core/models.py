"""The models family: the served models by name, what each can do, and `GET /v1/models`."""

from __future__ import annotations

import time
from typing import Any

from ..config import Settings
from ..engine.base import Engine, ModelBackend
from . import schemas
from .errors import BadRequest, ModelNotFound, Unavailable

CAPABILITY_WORDS = {
    "embed": "text embeddings",
    "image_embed": "image embeddings",
    "audio_embed": "audio embeddings",
    "rerank": "reranking",
    "classify": "classification",
    "late_chunking": "late chunking",
    "sparse_embed": "sparse embeddings (return_sparse, TEI's /embed_sparse)",
    "multi_embed": "multi-vectors (return_multivector)",
    "token_embed": "token embeddings (TEI's /embed_all)",
}


class Models:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.names = [spec.served_name for spec in settings.models]
        self.engine = engine
        self.started_at = int(time.time())

    def get(self, name: str) -> ModelBackend:
        if name not in self.names:
            raise ModelNotFound(
                f"model {name!r} is not served here; available models: {', '.join(self.names)}",
                param="model",
            )
        engine = self.engine
        if engine.state == "failed":
            raise Unavailable(f"models failed to load: {engine.failure}", code="load_failed")
        if not engine.ready:
            raise Unavailable(f"model {name!r} is {engine.state}; retry shortly")
        return engine.models[name]

    def require(self, name: str, capability: str) -> ModelBackend:
        """The model `name`, or a 400 naming the model and what it does support."""
        model = self.get(name)
        capabilities = model.info.capabilities
        if capability not in capabilities:
            supported = ", ".join(CAPABILITY_WORDS[c] for c in sorted(capabilities))
            raise BadRequest(
                f"model {name!r} does not support {CAPABILITY_WORDS[capability]}; "
                f"it supports: {supported}",
                param="model",
                code="capability_not_supported",
            )
        return model

    def default(self, *capabilities: str) -> str:
        """The first served model (in MODEL_NAMES order) with one of `capabilities`: the model
        of a request whose dialect names none (TEI, Cohere v1)."""
        for name in self.names:
            if self.get(name).info.capabilities & set(capabilities):
                return name
        wanted = " or ".join(CAPABILITY_WORDS[c] for c in capabilities)
        raise BadRequest(f"no served model does {wanted}; served: {', '.join(self.names)}",
                         param="model", code="capability_not_supported")

    def card(self, name: str) -> dict[str, Any]:
        model = self.get(name)
        return schemas.model_card(model.info, model.queue(), self.started_at)

    async def list(self, _body: Any = None) -> dict[str, Any]:
        """`GET /v1/models` (a RunPod job's `openai_input` for it is empty)."""
        return schemas.model_list([self.card(name) for name in self.names])
