"""The transport-free core: list_models, embed, rerank.

Takes parsed JSON bodies, returns response dicts (embeddings as numpy rows, see `encoding.dumps`),
raises `errors.APIError`. Knows nothing about HTTP or RunPod.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import AfterValidator, BaseModel, ValidationError

from . import metrics
from .batching import LengthBatcher
from .config import Settings
from .encoding import as_matrix, encode_rows, truncate
from .engine_guard import Fault, is_fault
from .engines import Engines
from .errors import (
    APIError,
    BadRequest,
    DeadlineExceeded,
    ModelFault,
    NotFound,
    NotImplementedModality,
    Overloaded,
    PayloadTooLarge,
    from_validation_error,
    too_many,
)
from .logs import annotate
from .inputs import ImageFetcher
from .schemas import EmbeddingRequest, EmbedItem, RerankItem, RerankRequest, type_name

M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type_name(body)}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _pair_length(pair: tuple[str, str]) -> int:
    return len(pair[0]) + len(pair[1])


# The batcher weighs inputs by characters, a stand-in for tokens. Past the model's window every
# input is truncated to the same cost, so lengths are capped at this many characters per window
# token, generous enough that no input within the window reaches it (prose runs 4-5 characters a
# token, the benchmark's random words ~8): overlong inputs of any length then share batches.
_CHARS_PER_TOKEN = 10


def _capped(length: Callable[[Any], int], window: int | None) -> Callable[[Any], int]:
    if window is None:
        return length
    cap = window * _CHARS_PER_TOKEN
    return lambda value: min(length(value), cap)


def _sigmoid(scores: list[float]) -> list[float]:
    return (1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64)))).tolist()


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": int(tokens), "total_tokens": int(tokens)}


# Requests up to this many characters count their tokens on the event loop (~20 µs per short text).
_INLINE_TOKENIZE_CHARS = 2000

# The message a transport cancels an operation with when its caller went away.
CLIENT_GONE = "client disconnected"


@dataclass
class _Served:
    tokens: int = 0


class Core:
    # The started core of this process, for validators BentoML runs before batching.
    current: ClassVar[Core | None] = None

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engines = Engines(settings)
        self.images = ImageFetcher(settings)
        self._dims: dict[str, int] = {}  # learnt from the first embedding of each model
        self.in_flight = 0  # embed/rerank requests being served (MAX_CONCURRENT_REQUESTS)
        self.queued: dict[str, int] = defaultdict(int)  # admitted, unfinished items per model
        self._batchers: dict[tuple[str, str], LengthBatcher] = {}

    async def start(self) -> None:
        await self.images.start()
        await self.engines.start()
        Core.current = self

    async def stop(self) -> None:
        await self.engines.stop()
        await self.images.stop()

    @property
    def ready(self) -> bool:
        """Started, and no model's batch loop has left work waiting past ENGINE_STALL_TIMEOUT."""
        return self.engines.ready and not self.engines.stalled

    # --- admission, deadline, accounting: one place for every embed/rerank request ---

    @asynccontextmanager
    async def _serving(self, operation: str, model: str, items: int) -> AsyncIterator[_Served]:
        annotate(model=model, items=items)
        engine = self.engines.get(model)
        limit = self.settings.max_concurrent_requests
        if self.in_flight >= limit:
            metrics.rejected(model, "concurrency")
            raise Overloaded(
                f"the server is at its limit of {limit} concurrent requests "
                f"(MAX_CONCURRENT_REQUESTS); retry shortly"
            )
        queued = self.queued[model]
        # a request larger than the whole bound is still served when nothing else waits
        if queued and queued + items > self.settings.infinity_queue_size:
            metrics.rejected(model, "queue")
            raise Overloaded(
                f"model {model!r} has {queued} items waiting and this request adds {items}, over "
                f"INFINITY_QUEUE_SIZE={self.settings.infinity_queue_size}; retry shortly"
            )
        served, outcome, start = _Served(), "error", time.perf_counter()
        self.in_flight += 1
        self.queued[model] += items
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                yield served
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
            raise DeadlineExceeded(
                f"the request did not finish within {self.settings.request_timeout:g}s "
                f"(REQUEST_TIMEOUT) and was cancelled"
            ) from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except APIError as exc:
            outcome = "client_error" if exc.status < 500 else "error"
            raise
        finally:
            self.in_flight -= 1
            self.queued[model] -= items
            metrics.queue_depth(model, engine.overload_status().queue_absolute)
            metrics.request(operation, model, outcome, time.perf_counter() - start,
                            items if outcome == "ok" else 0, served.tokens)
            annotate(tokens=served.tokens or None)

    async def _compute(self, model: str, call: Awaitable[Any]) -> Any:
        """Await an engine call, telling the model's guard (stall detection) about it."""
        guard = self.engines.guards[model]
        guard.submitted()
        abandoned = False
        try:
            return await call
        except asyncio.CancelledError as exc:
            abandoned = CLIENT_GONE in exc.args
            raise
        finally:
            guard.finished(abandoned=abandoned)

    def _batcher(self, model: str, operation: str) -> LengthBatcher:
        """The model's `LengthBatcher` for `operation`, which forms the engine's batches from
        every waiting input by length."""
        batcher = self._batchers.get((model, operation))
        if batcher is None:
            engine = self.engines.get(model)
            if operation == "embed":
                call, length = (lambda batch: engine.embed(sentences=batch)), len
            else:  # (query, document) pairs
                call, length = (lambda batch: self.engines.score_pairs(model, batch)), _pair_length
            batcher = self._batchers[(model, operation)] = LengthBatcher(
                call, length=_capped(length, self.engines.windows.get(model)),
                max_in_flight=2,  # one computing, one being tokenised
                max_items=engine.engine_args.batch_size,
            )
        return batcher

    async def _embed_texts(self, model: str, texts: list[str]) -> tuple[list[Any], int]:
        """Text embeddings for one request, and the request's own usage."""
        return await self._batched(model, "embed", texts, texts)

    async def _score_pairs(self, model: str, query: str, documents: list[str]) -> tuple[list[float], int]:
        """Raw relevance scores of `query` with each document, and the request's own usage
        (infinity's count: query and document as one text)."""
        return await self._batched(model, "rerank", [(query, d) for d in documents],
                                   [query + d for d in documents])

    async def _batched(self, model: str, operation: str, inputs: list[Any],
                       texts: list[str]) -> tuple[list[Any], int]:
        batcher = self._batcher(model, operation)
        if sum(map(len, texts)) <= _INLINE_TOKENIZE_CHARS:
            # a few short texts tokenise in microseconds: cheaper than a hop to a thread
            return await batcher.submit(inputs), self.engines.usage(model, texts)
        rows, tokens = await asyncio.gather(batcher.submit(inputs),
                                            asyncio.to_thread(self.engines.usage, model, texts))
        return rows, tokens

    def _check_text(self, model: str, field: str, texts: list[str]) -> None:
        limit = self.settings.max_text_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                raise PayloadTooLarge(
                    f"{field}[{i}]: {len(text)} characters, at most {limit} per text "
                    f"(MAX_TEXT_CHARS)", param=field,
                )

    async def _check_window(self, model: str, field: str, texts: list[str],
                            query: str | None = None) -> None:
        """With TRUNCATE_INPUTS=false, refuse texts the model would have to truncate."""
        window = self.engines.windows.get(model)
        if self.settings.truncate_inputs or window is None:
            return
        counts = await asyncio.to_thread(self.engines.count_tokens, model, texts, query)
        for i, count in enumerate(counts or []):
            if count > window:
                what = "query and document together are" if query is not None else "it is"
                raise BadRequest(
                    f"{field}[{i}]: {what} {count} tokens, over the model's window of {window} "
                    f"tokens (TRUNCATE_INPUTS=false refuses instead of truncating)",
                    param=field, code="context_length_exceeded",
                )

    # --- models ---

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.engines.card(name) for name in self.engines.names]}

    # --- embeddings ---

    async def embed(self, body: Any) -> dict[str, Any]:
        request = parse(EmbeddingRequest, body)
        if len(request.input) > self.settings.max_input_items:
            raise too_many("input", len(request.input), self.settings.max_input_items, "MAX_INPUT_ITEMS")
        if request.modality == "audio":
            raise NotImplementedModality(
                "modality 'audio' is not supported yet; use 'text' or 'image'", param="modality"
            )
        image = request.modality == "image"
        engine = self.engines.require(request.model, "image_embed" if image else "embed")
        self._check_dimensions(request.model, request.dimensions)
        if not image:
            self._check_text(request.model, "input", request.input)
        async with self._serving("embed", request.model, len(request.input)) as served:
            if image:
                # every image is fetched and decoded before any reaches the engine
                try:
                    images = await self.images.load_all(request.input)
                except BadRequest:
                    metrics.image_failure(request.model)
                    raise
                embeddings, tokens = await self._compute(request.model, engine.image_embed(images=images))
            else:
                await self._check_window(request.model, "input", request.input)
                embeddings, tokens = await self._compute(
                    request.model, self._embed_texts(request.model, request.input))
            _raise_faults(self.engines, request.model, "input", embeddings)
            served.tokens = tokens
        matrix = as_matrix(embeddings)
        self._dims.setdefault(request.model, matrix.shape[1])
        self._check_dimensions(request.model, request.dimensions)
        rows = encode_rows(truncate(matrix, request.dimensions), request.encoding_format)
        return {
            "object": "list",
            "model": request.model,
            "data": [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(rows)],
            "usage": _usage(tokens),
        }

    def _check_dimensions(self, model: str, dimensions: int | None) -> None:
        full = self._dims.get(model)
        if dimensions is not None and full is not None and dimensions > full:
            raise BadRequest(
                f"dimensions: {dimensions} is out of range; model {model!r} produces {full} "
                f"dimensions, so use 1..{full}",
                param="dimensions",
            )

    # --- rerank ---

    async def rerank(self, body: Any) -> dict[str, Any]:
        request = parse(RerankRequest, body)
        limit = self.settings.max_rerank_documents
        if len(request.documents) > limit:
            raise too_many("documents", len(request.documents), limit, "MAX_RERANK_DOCUMENTS")
        self.engines.require(request.model, "rerank")
        self._check_text(request.model, "query", [request.query])
        self._check_text(request.model, "documents", request.documents)
        async with self._serving("rerank", request.model, len(request.documents)) as served:
            await self._check_window(request.model, "documents", request.documents, request.query)
            # top_n is applied here, after the fault check: a failed document must not hide
            # behind the cut
            scores, tokens = await self._compute(
                request.model, self._score_pairs(request.model, request.query, request.documents))
            _raise_faults(self.engines, request.model, "documents", scores)
            served.tokens = tokens
        if not request.raw_scores:
            scores = _sigmoid(scores)
        ranked = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable
        if request.top_n is not None and request.top_n > 0:
            ranked = ranked[: request.top_n]
        results = []
        for i in ranked:
            result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if request.return_documents:
                result["document"] = {"text": request.documents[i]}
            results.append(result)
        return {
            "object": "rerank",
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": request.model,
            "results": results,
            "usage": _usage(tokens),
        }

    # --- RunPod "standard" job inputs (also POST /runsync on the HTTP server) ---

    async def dispatch(self, job_input: Any) -> dict[str, Any]:
        """Route a job's `input` to the operation it names; the same core as the HTTP routes."""
        if not isinstance(job_input, dict):
            raise BadRequest(f"job input must be a JSON object; {JOB_SHAPES}")
        if "openai_route" in job_input:
            route = str(job_input["openai_route"]).rstrip("/")
            body = job_input.get("openai_input") or {}
            operation = OPENAI_ROUTES.get(route.removeprefix("/openai").removeprefix("/v1"))
            if operation is None:
                raise NotFound(
                    f"openai_route {job_input['openai_route']!r} is not supported; expected one "
                    f"of /v1/models, /v1/embeddings, /v1/rerank",
                    param="openai_route",
                )
            return await operation(self, body)
        if "query" in job_input:
            return await self.rerank(job_input)
        if "input" in job_input:
            return await self.embed(job_input)
        raise BadRequest(f"unrecognised job input; {JOB_SHAPES}")

    # --- batchable entry points (BentoML adaptive batching across callers) ---

    async def embed_items(self, items: Sequence[EmbedItem]) -> list[list[float]]:
        """Embeddings for items that may name different models; order preserved."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.model].append(i)
        out: list[Any] = [None] * len(items)

        async def run(model: str, positions: list[int]) -> None:
            self.engines.require(model, "embed")
            vectors = await self._compute(
                model, self._batcher(model, "embed").submit([items[i].text for i in positions]))
            _raise_faults(self.engines, model, "items", vectors)
            for i, vector in zip(positions, vectors):
                out[i] = np.asarray(vector, dtype=np.float32).tolist()

        await asyncio.gather(*(run(m, p) for m, p in groups.items()))
        return out

    async def rerank_items(self, items: Sequence[RerankItem]) -> list[float]:
        """Relevance score (sigmoid) per (query, document) pair; pairs may differ in query/model."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.model].append(i)
        out: list[float] = [0.0] * len(items)

        async def run(model: str, positions: list[int]) -> None:
            self.engines.require(model, "rerank")
            pairs = [(items[i].query, items[i].document) for i in positions]
            scores = await self._compute(model, self._batcher(model, "rerank").submit(pairs))
            _raise_faults(self.engines, model, "items", scores)
            for i, score in zip(positions, _sigmoid(scores)):
                out[i] = score

        await asyncio.gather(*(run(m, p) for m, p in groups.items()))
        return out


def _raise_faults(engines: Engines, model: str, field: str,
                  results: Sequence[Any] | dict[int, Any]) -> None:
    """A model fault on some items (see engine_guard) fails this request, and only this one."""
    pairs = results.items() if isinstance(results, dict) else enumerate(results)
    for i, value in sorted(pairs, key=lambda p: p[0]):
        if is_fault(value):
            # scores lose the Fault type in infinity's arithmetic; the guard kept the reason
            reason = value.error if isinstance(value, Fault) else engines.guards[model].last_fault
            raise ModelFault(f"model {model!r} failed on {field}[{i}]: {reason}", param=field)


def served_with(capability: str) -> AfterValidator:
    """Per-request check of a batch item's model, run by BentoML before the item joins a batch:
    one caller's bad model must not fail the other callers' items batched with it."""

    def check(item: Any) -> Any:
        core = Core.current
        if core is None:
            raise ValueError("the service is starting; retry shortly")
        try:
            core.engines.require(item.model, capability)
        except APIError as exc:
            raise ValueError(exc.message) from None
        return item

    return AfterValidator(check)


JOB_SHAPES = (
    'expected {"openai_route": "/v1/models" | "/v1/embeddings" | "/v1/rerank", "openai_input": '
    '{...}}, an embedding body {"model", "input", "modality"?}, or a rerank body '
    '{"model", "query", "docs"}'
)


async def _list_models(core: Core, _: Any) -> dict[str, Any]:
    return core.list_models()


OPENAI_ROUTES = {"/models": _list_models, "/embeddings": Core.embed, "/rerank": Core.rerank}
