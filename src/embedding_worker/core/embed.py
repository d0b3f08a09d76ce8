"""The embed family: `POST /v1/embeddings` (texts and images) and the batchable `/batch/embed`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..observability import metrics
from . import schemas
from .batching import PerModel
from .encoding import as_matrix, encode_rows, truncate
from .errors import BadRequest, NotImplementedModality, too_many
from .images import ImageFetcher
from .models import Models
from .pipeline import Pipeline, parse, per_model
from .schemas import EmbeddingRequest, EmbedItem


class Embeddings:
    def __init__(self, pipeline: Pipeline, models: Models, images: ImageFetcher):
        self.pipeline = pipeline
        self.models = models
        self.images = images
        self.batcher = PerModel(lambda model: model.embed, len)
        self._dims: dict[str, int] = {}  # learnt from the first embedding of each model

    async def create(self, body: Any) -> dict[str, Any]:
        settings = self.pipeline.settings
        request = parse(EmbeddingRequest, body)
        if len(request.input) > settings.max_input_items:
            raise too_many("input", len(request.input), settings.max_input_items, "MAX_INPUT_ITEMS")
        if request.modality == "audio":
            raise NotImplementedModality(
                "modality 'audio' is not supported yet; use 'text' or 'image'", param="modality"
            )
        image = request.modality == "image"
        model = self.models.require(request.model, "image_embed" if image else "embed")
        self._check_dimensions(request.model, request.dimensions)
        if not image:
            self.pipeline.check_sizes("input", request.input)
        async with self.pipeline.admit("embed", model, len(request.input)) as served:
            if image:
                # every image is fetched and decoded before any reaches the engine
                try:
                    images = await self.images.load_all(request.input)
                except BadRequest:
                    metrics.image_failure(request.model)
                    raise
                call = model.embed_images(images)
            else:
                await self.pipeline.check_window(model, "input", request.input)
                call = self.pipeline.batched(model, self.batcher(model), request.input,
                                             request.input)
            embeddings, served.tokens = await self.pipeline.compute(model, call, served)
            self.pipeline.raise_faults(model, "input", embeddings)
        matrix = as_matrix(embeddings)
        self._dims.setdefault(request.model, matrix.shape[1])
        self._check_dimensions(request.model, request.dimensions)
        rows = encode_rows(truncate(matrix, request.dimensions), request.encoding_format)
        return schemas.embedding_response(request.model, rows, served.tokens)

    def _check_dimensions(self, model: str, dimensions: int | None) -> None:
        full = self._dims.get(model)
        if dimensions is not None and full is not None and dimensions > full:
            raise BadRequest(
                f"dimensions: {dimensions} is out of range; model {model!r} produces {full} "
                f"dimensions, so use 1..{full}",
                param="dimensions",
            )

    async def items(self, items: Sequence[EmbedItem]) -> list[list[float]]:
        """Embeddings for batch items that may name different models; order preserved."""
        out: list[Any] = [None] * len(items)

        async def run(name: str, positions: list[int]) -> None:
            model = self.models.require(name, "embed")
            call = self.batcher(model).submit([items[i].text for i in positions])
            vectors = await self.pipeline.compute(model, call)
            self.pipeline.raise_faults(model, "items", vectors)
            for i, vector in zip(positions, vectors):
                out[i] = np.asarray(vector, dtype=np.float32).tolist()

        await per_model(items, run)
        return out
