"""The rerank family: `POST /v1/rerank` (and its aliases) and the batchable `/batch/rerank`.

A cross-encoder scores each (query, document) pair; a model of multi-vectors (BGE-M3, ColBERT:
the query encoded as a query, the documents as documents) scores by MaxSim: each query vector's
best match among the document's, averaged over the query's vectors (FlagEmbedding's
`colbert_score`; `raw_scores`: their sum, PyLate's `colbert_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import schemas
from .batching import PerModel, pair_length
from .errors import too_many
from .embed import EmbedJob
from .models import Models
from .outputs import Outputs
from .pipeline import Pipeline, parse, per_model
from .schemas import RerankItem, RerankRequest


def sigmoid(scores: Sequence[float]) -> list[float]:
    return (1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64)))).tolist()


@dataclass
class Ranked:
    scores: list[float]  # per document, in the request's order
    ranked: list[int]  # document indices, best first
    tokens: int


class Rerank:
    def __init__(self, pipeline: Pipeline, models: Models, outputs: Outputs):
        self.pipeline = pipeline
        self.models = models
        self.outputs = outputs
        # (query, document) pairs of every request, batched by length whatever their query
        self.batcher = PerModel(lambda model: model.score, pair_length)

    async def create(self, body: Any) -> dict[str, Any]:
        request = parse(RerankRequest, body)
        done = await self.scores(request.model, request.query, request.documents,
                                 raw_scores=request.raw_scores)
        ranked = done.ranked[: request.top_n] if request.top_n is not None else done.ranked
        documents = request.documents if request.return_documents else None
        return schemas.rerank_response(request.model, done.scores, ranked, documents,
                                       done.tokens)

    async def scores(self, name: str, query: str, documents: list[str], *,
                     raw_scores: bool = False, truncate: bool | None = None) -> Ranked:
        """Each document's score for `query` (sigmoid unless `raw_scores`) and the documents'
        order, best first. `truncate`: None follows TRUNCATE_INPUTS; False refuses a pair over
        the model's window."""
        settings = self.pipeline.settings
        limit = settings.max_rerank_documents
        if len(documents) > limit:
            raise too_many("documents", len(documents), limit, "MAX_RERANK_DOCUMENTS")
        model = self.models.require(name, "rerank")
        if "multi_embed" in model.info.capabilities:
            return await self._maxsim(name, query, documents, raw_scores, truncate)
        self.pipeline.check_sizes("query", [query])
        self.pipeline.check_sizes("documents", documents)
        refuse = not settings.truncate_inputs if truncate is None else not truncate
        async with self.pipeline.admit("rerank", model, len(documents)) as served:
            if refuse:
                await self.pipeline.check_window(model, "documents", documents, query, why=(
                    "truncate=false" if truncate is False else "TRUNCATE_INPUTS=false"))
            # usage as infinity counts it: query and document as one text
            pairs = [(query, d) for d in documents]
            call = self.pipeline.batched(model, self.batcher(model).submit(pairs),
                                         [query + d for d in documents])
            scores, served.tokens = await self.pipeline.compute(model, call, served)
            # top_n is applied after the fault check: a failed document must not hide behind it
            self.pipeline.raise_faults(model, "documents", scores)
        if not raw_scores:
            scores = sigmoid(scores)
        ranked = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable
        return Ranked(list(scores), ranked, served.tokens)

    async def _maxsim(self, name: str, query: str, documents: list[str], raw_scores: bool,
                      truncate: bool | None) -> Ranked:
        """Scores of a multi-vector model: its query and documents embedded as any texts (one
        pass each, batched with the model's other work), then MaxSim."""
        cut = None if truncate is None else "END" if truncate else "NONE"
        # as queries and documents, for a model that encodes them apart (ColBERT)
        query_job = EmbedJob(model=name, inputs=[query], field="query", truncate=cut,
                             input_type="query")
        documents_job = EmbedJob(model=name, inputs=documents, field="documents", truncate=cut,
                                 input_type="document")
        # one after the other: a request holds one admission at a time (MAX_CONCURRENT_REQUESTS)
        asked = await self.outputs.parts(query_job, {"multi"})
        found = await self.outputs.parts(documents_job, {"multi"})
        vectors = asked.rows[0].multi
        sums = [float((vectors @ row.multi.T).max(1).sum()) for row in found.rows]
        scores = sums if raw_scores else [total / len(vectors) for total in sums]
        ranked = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
        return Ranked(scores, ranked, asked.tokens + found.tokens)

    async def items(self, items: Sequence[RerankItem]) -> list[float]:
        """Relevance score (sigmoid) per (query, document) batch item; items may differ in
        query and model."""
        out: list[float] = [0.0] * len(items)

        async def run(name: str, positions: list[int]) -> None:
            model = self.models.require(name, "rerank")
            if "multi_embed" in model.info.capabilities:  # MaxSim, item by item
                for i in positions:
                    done = await self._maxsim(name, items[i].query, [items[i].document], False,
                                              None)
                    out[i] = done.scores[0]
                return
            pairs = [(items[i].query, items[i].document) for i in positions]
            scores = await self.pipeline.compute(model, self.batcher(model).submit(pairs))
            self.pipeline.raise_faults(model, "items", scores)
            for i, score in zip(positions, sigmoid(scores)):
                out[i] = score

        await per_model(items, run)
        return out
