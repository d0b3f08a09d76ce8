"""The classify family: sequence classifiers (sentiment, NLI, topic) on `POST /v1/classify`,
TEI's `/predict` and RunPod jobs. The engine gives logits in label order; probabilities are
made here, as the model's transformers pipeline would (softmax, or sigmoid for a one-label or
multi-label model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import schemas
from .batching import PerModel
from .errors import too_many
from .models import Models
from .pipeline import Pipeline, parse
from .schemas import ClassifyRequest


@dataclass
class Classified:
    rows: list[list[tuple[str, float]]]  # per text, (label, score) best first
    tokens: int


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    logits = logits.astype(np.float64)
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Classify:
    def __init__(self, pipeline: Pipeline, models: Models):
        self.pipeline = pipeline
        self.models = models
        self.batcher = PerModel(lambda model: model.classify, len)

    async def create(self, body: Any) -> dict[str, Any]:
        request = parse(ClassifyRequest, body)
        done = await self.labels(request.model, request.input, raw_scores=request.raw_scores,
                                 top_k=request.top_k)
        return schemas.classify_response(request.model, done.rows, done.tokens)

    async def labels(self, name: str, texts: list[str], *, field: str = "input",
                     raw_scores: bool = False, top_k: int | None = None,
                     truncate: bool | None = None) -> Classified:
        """Each text's labels with their scores, best first (`top_k` of them). `truncate`:
        None follows TRUNCATE_INPUTS; False refuses a text over the model's window."""
        pipeline, settings = self.pipeline, self.pipeline.settings
        if len(texts) > settings.max_input_items:
            raise too_many(field, len(texts), settings.max_input_items, "MAX_INPUT_ITEMS")
        model = self.models.require(name, "classify")
        pipeline.check_sizes(field, texts)
        refuse = not settings.truncate_inputs if truncate is None else not truncate
        async with pipeline.admit("classify", model, len(texts)) as served:
            if refuse:
                await pipeline.check_window(model, field, texts, why=(
                    "truncate=false" if truncate is False else "TRUNCATE_INPUTS=false"))
            call = pipeline.batched(model, self.batcher(model).submit(texts), texts)
            logits, served.tokens = await pipeline.compute(model, call, served)
            pipeline.raise_faults(model, field, logits)
        scores = np.stack(logits)
        if not raw_scores:
            scores = activate(scores, model.info.label_activation)
        labels = model.info.labels
        rows = []
        for row in scores:
            best = np.argsort(-row, kind="stable")[:top_k]
            rows.append([(labels[i], float(row[i])) for i in best])
        return Classified(rows, served.tokens)
