"""The embed family: `POST /v1/embeddings` (texts and images) and the batchable `/batch/embed`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..engine.base import ModelBackend
from ..observability import metrics
from . import schemas
from .batching import PerModel
from .encoding import as_matrix, encode_rows, quantize, truncate
from .errors import BadRequest, NotImplementedModality, too_many
from .images import ImageFetcher
from .models import Models
from .options import Prompt, choose_prompt, keep_ends
from .pipeline import Pipeline, parse, per_model
from .schemas import EmbeddingRequest, EmbedItem


class Embeddings:
    def __init__(self, pipeline: Pipeline, models: Models, images: ImageFetcher):
        self.pipeline = pipeline
        self.models = models
        self.images = images
        self.batcher = PerModel(lambda model: model.embed, len)

    async def create(self, body: Any) -> dict[str, Any]:
        pipeline = self.pipeline
        settings = pipeline.settings
        request = parse(EmbeddingRequest, body)
        if len(request.input) > settings.max_input_items:
            raise too_many("input", len(request.input), settings.max_input_items, "MAX_INPUT_ITEMS")
        if request.modality == "audio":
            raise NotImplementedModality(
                "modality 'audio' is not supported yet; use 'text' or 'image'", param="modality"
            )
        image = request.modality == "image"
        model = self.models.require(request.model, "image_embed" if image else "embed")
        check_output(model, request.dimensions, request.output_dtype)
        prompt = Prompt() if image else choose_prompt(model, request.prompt_name,
                                                      request.input_type, request.task)
        if not image:
            pipeline.check_sizes("input", request.input)
        truncation = request.truncate or ("END" if settings.truncate_inputs else "NONE")
        async with pipeline.admit("embed", model, len(request.input)) as served:
            if image:
                # every image is fetched and decoded before any reaches the engine
                try:
                    images = await self.images.load_all(request.input)
                except BadRequest:
                    metrics.image_failure(request.model)
                    raise
                call = model.embed_images(images)
            else:
                texts = request.input
                if truncation == "START":
                    texts = await keep_ends(model, texts, prompt.text)
                if prompt.text:
                    texts = [prompt.text + text for text in texts]
                if truncation == "NONE":
                    await pipeline.check_window(model, "input", texts, why=(
                        "truncate=NONE" if request.truncate else "TRUNCATE_INPUTS=false"))
                call = pipeline.batched(model, self.batcher(model), texts, texts)
            embeddings, served.tokens = await pipeline.compute(model, call, served)
            pipeline.raise_faults(model, "input", embeddings)
        matrix = quantize(truncate(as_matrix(embeddings), request.dimensions), request.output_dtype)
        rows = encode_rows(matrix, request.encoding_format)
        return schemas.embedding_response(request.model, rows, served.tokens, prompt.name,
                                          prompt.note)

    async def items(self, items: Sequence[EmbedItem]) -> list[list[float]]:
        """Embeddings for batch items that may name different models; order preserved."""
        out: list[Any] = [None] * len(items)

        async def run(name: str, positions: list[int]) -> None:
            model = self.models.require(name, "embed")
            texts = []
            for i in positions:  # the prompt was checked before batching (api.batch)
                prompt = choose_prompt(model, items[i].prompt_name, None, None)
                texts.append(prompt.text + items[i].text)
            call = self.batcher(model).submit(texts)
            vectors = await self.pipeline.compute(model, call)
            self.pipeline.raise_faults(model, "items", vectors)
            for i, vector in zip(positions, vectors):
                out[i] = np.asarray(vector, dtype=np.float32).tolist()

        await per_model(items, run)
        return out


def check_output(model: ModelBackend, dimensions: int | None, output_dtype: str) -> None:
    """`dimensions` within the model's size, and a multiple of 8 for a binary output."""
    full = model.info.dimensions
    if dimensions is not None and full is not None and dimensions > full:
        raise BadRequest(
            f"dimensions: {dimensions} is out of range; model {model.info.name!r} produces {full} "
            f"dimensions, so use 1..{full}",
            param="dimensions",
        )
    size = dimensions or full
    if output_dtype in ("binary", "ubinary") and size is not None and size % 8:
        raise BadRequest(
            f"output_dtype: {output_dtype} packs 8 dimensions per byte, and {size} is not a "
            f"multiple of 8; ask for dimensions that are", param="output_dtype",
        )
