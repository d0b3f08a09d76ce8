"""The rerank family: `POST /v1/rerank` (and its aliases) and the batchable `/batch/rerank`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import schemas
from .batching import PerModel, pair_length
from .errors import too_many
from .models import Models
from .pipeline import Pipeline, parse, per_model
from .schemas import RerankItem, RerankRequest


def sigmoid(scores: Sequence[float]) -> list[float]:
    return (1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64)))).tolist()


class Rerank:
    def __init__(self, pipeline: Pipeline, models: Models):
        self.pipeline = pipeline
        self.models = models
        # (query, document) pairs of every request, batched by length whatever their query
        self.batcher = PerModel(lambda model: model.score, pair_length)

    async def create(self, body: Any) -> dict[str, Any]:
        request = parse(RerankRequest, body)
        limit = self.pipeline.settings.max_rerank_documents
        if len(request.documents) > limit:
            raise too_many("documents", len(request.documents), limit, "MAX_RERANK_DOCUMENTS")
        model = self.models.require(request.model, "rerank")
        self.pipeline.check_sizes("query", [request.query])
        self.pipeline.check_sizes("documents", request.documents)
        async with self.pipeline.admit("rerank", model, len(request.documents)) as served:
            if not self.pipeline.settings.truncate_inputs:
                await self.pipeline.check_window(model, "documents", request.documents,
                                                 request.query)
            # usage as infinity counts it: query and document as one text
            call = self.pipeline.batched(model, self.batcher(model),
                                         [(request.query, d) for d in request.documents],
                                         [request.query + d for d in request.documents])
            scores, served.tokens = await self.pipeline.compute(model, call, served)
            # top_n is applied after the fault check: a failed document must not hide behind it
            self.pipeline.raise_faults(model, "documents", scores)
        if not request.raw_scores:
            scores = sigmoid(scores)
        ranked = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable
        if request.top_n is not None:
            ranked = ranked[: request.top_n]
        documents = request.documents if request.return_documents else None
        return schemas.rerank_response(request.model, scores, ranked, documents, served.tokens)

    async def items(self, items: Sequence[RerankItem]) -> list[float]:
        """Relevance score (sigmoid) per (query, document) batch item; items may differ in
        query and model."""
        out: list[float] = [0.0] * len(items)

        async def run(name: str, positions: list[int]) -> None:
            model = self.models.require(name, "rerank")
            pairs = [(items[i].query, items[i].document) for i in positions]
            scores = await self.pipeline.compute(model, self.batcher(model).submit(pairs))
            self.pipeline.raise_faults(model, "items", scores)
            for i, score in zip(positions, sigmoid(scores)):
                out[i] = score

        await per_model(items, run)
        return out
