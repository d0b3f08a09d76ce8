"""The embed family: texts, images and audio to vectors for every dialect (OpenAI and Jina on
`/v1/embeddings`, Cohere's `/v1|v2/embed`, TEI's `/embed`) and the batchable `/batch/embed`.

A dialect turns its body into an `EmbedJob` and formats the `Embedded` it gets back; `compute`
does the rest once: limits, the model's capabilities, prompt, truncation, batching, faults,
normalisation and `dimensions`. Output types and encodings are the dialect's (`encoding`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.base import ModelBackend
from ..observability import metrics
from . import schemas
from .batching import PerModel
from .cache import EmbeddingCache
from .encoding import as_matrix, encode_rows, quantize, vectors
from .errors import BadRequest, too_many
from .media import MediaFetcher
from .models import Models
from .options import Prompt, choose_prompt, cut_to
from .outputs import Outputs, check_output, dense_of, several_outputs
from .pipeline import Pipeline, parse, per_model
from .schemas import Audio, EmbeddingRequest, EmbedItem, Image, Item


@dataclass
class EmbedJob:
    """One request's embedding work, whatever its dialect. `inputs`: texts, and `Image`s or
    `Audio`s for a model that embeds them (one vector each, in one space, order kept)."""

    model: str
    inputs: Sequence[Item]
    field: str = "input"  # what error messages call the inputs
    prompt_name: str | None = None
    input_type: str | None = None
    task: str | None = None
    truncate: str | None = None  # END, START, NONE; None: TRUNCATE_INPUTS decides
    max_tokens: int | None = None  # a token limit below the model's window (special included)
    dimensions: int | None = None
    normalize: bool = True  # False: the model's own vectors, where the engine can give them
    output_dtypes: Sequence[str] = ("float",)  # what the dialect will make of the vectors
    late_chunking: bool = False  # the inputs are one document's chunks, embedded in context


@dataclass
class Embedded:
    matrix: np.ndarray  # float32, one row per input
    tokens: int  # text tokens the model saw
    prompt: Prompt
    images: int  # how many inputs were images
    seconds: float | None = None  # the audio inputs' length, when there are any


class Embeddings:
    def __init__(self, pipeline: Pipeline, models: Models, media: MediaFetcher,
                 cache: EmbeddingCache | None = None):
        self.pipeline = pipeline
        self.models = models
        self.media = media
        self.batcher = PerModel(lambda model: model.embed, len)
        # clips of every request batched together: a CLAP model's input is one window whatever
        # the clip's length, so they are all of one length here
        self.clips = PerModel(lambda model: model.embed_audio, lambda _clip: 1)
        self.cache = cache
        self.cached = {spec.served_name for spec in pipeline.settings.models if spec.cache}
        self.outputs = Outputs(self)  # sparse and multi-vectors, through this family's batchers

    def _rows(self, model: ModelBackend, texts: list[str]) -> Awaitable[list[Any]]:
        """The texts' rows: through the cache where the model's are kept, else the batcher."""
        submit = self.batcher(model).submit
        name = model.info.name
        if self.cache is None or name not in self.cached or several_outputs(model):
            return submit(texts)
        return self.cache.rows(name, texts, submit)

    async def create(self, body: Any) -> dict[str, Any]:
        """`POST /v1/embeddings`: OpenAI's body, with Jina's and Cohere's fields beside it."""
        request = parse(EmbeddingRequest, body)
        job = EmbedJob(
            model=request.model, inputs=request.input, prompt_name=request.prompt_name,
            input_type=request.input_type, task=request.task, truncate=request.truncate,
            dimensions=request.dimensions, normalize=request.normalized,
            output_dtypes=(request.output_dtype,), late_chunking=request.late_chunking)
        if request.return_sparse or request.return_multivector:
            return await self.outputs.create(request, job)
        done = await self.compute(job)
        rows = encode_rows(quantize(done.matrix, request.output_dtype), request.encoding_format)
        return schemas.embedding_response(request.model, rows, done.tokens, done.prompt.name,
                                          done.prompt.note, done.seconds)

    async def compute(self, job: EmbedJob) -> Embedded:
        pipeline, settings, field = self.pipeline, self.pipeline.settings, job.field
        if len(job.inputs) > settings.max_input_items:
            raise too_many(field, len(job.inputs), settings.max_input_items, "MAX_INPUT_ITEMS")
        if job.late_chunking:
            return await self._late(job)
        text_at = [i for i, item in enumerate(job.inputs) if isinstance(item, str)]
        image_at = [i for i, item in enumerate(job.inputs) if isinstance(item, Image)]
        audio_at = [i for i, item in enumerate(job.inputs) if isinstance(item, Audio)]
        needs = [need for need, at in (("embed", text_at), ("image_embed", image_at),
                                       ("audio_embed", audio_at)) if at]
        model = self.models.require(job.model, needs[0])
        for need in needs[1:]:
            self.models.require(job.model, need)
        check_output(model, job.dimensions, job.output_dtypes, job.normalize)
        prompt = choose_prompt(model, job.prompt_name, job.input_type, job.task) if text_at \
            else Prompt()
        texts = [job.inputs[i] for i in text_at]
        pipeline.check_sizes(field, texts, text_at)  # type: ignore[arg-type]
        rows: list[Any] = [None] * len(job.inputs)
        seconds = None
        async with pipeline.admit("embed", model, len(job.inputs)) as served:
            if image_at:
                # every image is fetched and decoded before any reaches the engine
                try:
                    images = await self.media.load_all(
                        [job.inputs[i].url for i in image_at], field, image_at)  # type: ignore[union-attr]
                except BadRequest:
                    metrics.image_failure(job.model)
                    raise
                found, served.tokens = await pipeline.compute(model, model.embed_images(images),
                                                              served)
                for i, row in zip(image_at, found):
                    rows[i] = row
            if audio_at:  # as images: every clip fetched and decoded first
                rate = model.info.sampling_rate
                assert rate is not None  # an audio model has one
                try:
                    clips = await self.media.load_audio(
                        [job.inputs[i].url for i in audio_at], rate, field, audio_at)  # type: ignore[union-attr]
                except BadRequest:
                    metrics.audio_failure(job.model)
                    raise
                found = await pipeline.compute(
                    model, self.clips(model).submit([clip.samples for clip in clips]), served)
                seconds = sum(clip.seconds for clip in clips)
                for i, row in zip(audio_at, found):
                    rows[i] = row
            if text_at:
                texts = await self.fit(model, texts, prompt, job, text_at)  # type: ignore[arg-type]
                call = pipeline.batched(model, self._rows(model, texts), texts)
                found, tokens = await pipeline.compute(model, call, served)
                served.tokens += tokens
                for i, row in zip(text_at, found):
                    rows[i] = dense_of(row)
            pipeline.raise_faults(model, field, rows)
        matrix = vectors(as_matrix(rows), job.dimensions, job.normalize, model.info.unit_vectors)
        return Embedded(matrix, served.tokens, prompt, len(image_at), seconds)

    async def fit(self, model: ModelBackend, texts: list[str], prompt: Prompt, job: EmbedJob,
                   positions: list[int]) -> list[str]:
        """The texts as the model gets them: truncated as asked, the prompt before each."""
        settings = self.pipeline.settings
        truncation = job.truncate or ("END" if settings.truncate_inputs else "NONE")
        window = model.info.window
        limit = min(window, job.max_tokens) if window and job.max_tokens else window
        if truncation == "START" and limit:
            texts = await cut_to(model, texts, prompt.text, limit, keep="end")
        elif truncation == "END" and limit and window and limit < window:
            texts = await cut_to(model, texts, prompt.text, limit, keep="start")
        if prompt.text:
            texts = [prompt.text + text for text in texts]
        if truncation == "NONE":
            why = "truncate=NONE" if job.truncate else "TRUNCATE_INPUTS=false"
            await self.pipeline.check_window(
                model, job.field, texts, why=why, positions=positions,
                limit=(job.max_tokens, "max_tokens") if job.max_tokens else None)
        return texts

    async def _late(self, job: EmbedJob) -> Embedded:
        """Late chunking: the inputs are one document's consecutive chunks, read together
        (`ModelBackend.late_chunks`); truncate=NONE refuses a document past the window, any
        other truncation reads it in consecutive windows."""
        field = job.field
        if any(not isinstance(item, str) for item in job.inputs):
            raise BadRequest(f"late_chunking: {field} must be one document's text chunks; images "
                             f"and audio cannot be chunks of it", param="late_chunking")
        model = self.models.require(job.model, "embed")
        if "late_chunking" not in model.info.capabilities:
            raise BadRequest(f"late_chunking: model {job.model!r} {_why_not_late(model)}",
                             param="late_chunking", code="capability_not_supported")
        if job.max_tokens is not None:
            raise BadRequest("max_tokens does not apply with late_chunking: the document is read "
                             "whole, in windows of the model's", param="max_tokens")
        check_output(model, job.dimensions, job.output_dtypes, job.normalize)
        prompt = choose_prompt(model, job.prompt_name, job.input_type, job.task)
        chunks = [str(item) for item in job.inputs]
        self.pipeline.check_sizes(field, chunks, list(range(len(chunks))))
        truncation = job.truncate or ("END" if self.pipeline.settings.truncate_inputs else "NONE")
        window = model.info.window
        if truncation == "NONE" and window:
            document = prompt.text + " ".join(chunks)
            (count,) = await asyncio.to_thread(model.count_tokens, [document])
            if count > window:
                why = "truncate=NONE" if job.truncate else "TRUNCATE_INPUTS=false"
                raise BadRequest(
                    f"late_chunking: the document ({len(chunks)} chunks joined) is {count} tokens, "
                    f"over model {job.model!r}'s window of {window} ({why} refuses it; with "
                    f"truncate END it is read in consecutive windows of {window})",
                    param=field, code="context_length_exceeded")
        async with self.pipeline.admit("embed", model, len(chunks)) as served:
            done = await self.pipeline.compute(model, model.late_chunks(prompt.text, chunks),
                                               served)
            served.tokens = done.tokens
        empty = [i for i, count in enumerate(done.counts) if not count]
        if empty:
            raise BadRequest(f"{field}[{empty[0]}]: the chunk has no tokens of its own (late "
                             f"chunking averages each chunk's tokens)", param=field)
        matrix = vectors(done.matrix, job.dimensions, job.normalize, model.info.unit_vectors)
        return Embedded(matrix, served.tokens, prompt, 0)

    async def items(self, items: Sequence[EmbedItem]) -> list[list[float]]:
        """Embeddings for batch items that may name different models; order preserved."""
        out: list[Any] = [None] * len(items)

        async def run(name: str, positions: list[int]) -> None:
            model = self.models.require(name, "embed")
            texts = []
            for i in positions:  # the prompt was checked before batching (api.batch)
                prompt = choose_prompt(model, items[i].prompt_name, None, None)
                texts.append(prompt.text + items[i].text)
            found = await self.pipeline.compute(model, self._rows(model, texts))
            self.pipeline.raise_faults(model, "items", found)
            found = [dense_of(row) for row in found]
            matrix = vectors(as_matrix(found), None, True, model.info.unit_vectors)
            for i, vector in zip(positions, matrix):
                out[i] = vector.tolist()

        await per_model(items, run)
        return out


def _why_not_late(model: ModelBackend) -> str:
    info = model.info
    if info.pooling not in (None, "mean"):
        return (f"pools by {info.pooling}; late chunking averages each chunk's tokens, which "
                f"needs a mean-pooled model")
    return (f"is served by {info.backend} without per-token states (late chunking needs a "
            f"mean-pooled text embedder: sentence-transformers' on torch, or any on the CPU "
            f"engine)")
