"""The engine seam implemented on Infinity (`infinity-emb` as a library).

Uses infinity's public entry points only (`AsyncEngineArray`, `EngineArgs`, an engine's `embed`,
`image_embed`, `classify`, `capabilities`, `engine_args`, `overload_status`); what it needs beyond
them comes from `compat`, which checks it first. Prompts and logging are `engine.combined`'s, for
both engines.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from functools import cached_property
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelSpec, Settings
from ..observability.logs import one_line
from . import compat, late_chunking, model_config
from .base import (Engine, Heartbeat, LateChunks, ModelBackend, ModelInfo, QueueStats, Rows, Tokens,
                   is_fault)
from .fault_guard import FaultGuard

if TYPE_CHECKING:  # infinity is imported lazily: it reads its environment at import time
    from infinity_emb import AsyncEmbeddingEngine, AsyncEngineArray

logger = logging.getLogger("embedding_worker")

# late chunking: a document's windows per forward pass, at most this many tokens together
LATE_TOKENS_PER_CALL = 4096


class InfinityModel(ModelBackend):
    def __init__(self, engine: AsyncEmbeddingEngine, info: ModelInfo, adapted: compat.Adapted,
                 guard: FaultGuard):
        self._engine = engine
        self._adapted = adapted
        self._guard = guard
        self.info = info
        self.heartbeat = guard.heartbeat
        self._counter: tuple[threading.Lock, Any] | None = None

    @property
    def last_fault(self) -> str:
        return self._guard.last_fault

    async def embed(self, texts: list[str]) -> Rows:
        return await self._engine.embed(sentences=texts)

    async def embed_images(self, images: list[Any]) -> Rows:
        return await self._engine.image_embed(images=images)

    async def classify(self, texts: list[str]) -> Rows:
        # compat's "classifier logits" makes every row the raw scores in label order
        return await self._engine.classify(sentences=texts, raw_scores=True)

    async def score(self, pairs: list[tuple[str, str]]) -> Rows:
        scores, usage = await self._adapted.score(pairs)
        return list(scores), usage

    def usage(self, texts: list[str]) -> int:
        return int(sum(self._adapted.usage(texts)))

    def _tokenizer(self) -> tuple[threading.Lock, Any] | None:
        """Our own tokenizer copy, used under its lock: fast tokenizers are not re-entrant, and
        the model's own copy is busy in infinity's pre-processing thread."""
        if self._counter is None and self._adapted.tokenizer is not None:
            self._counter = (threading.Lock(), copy.deepcopy(self._adapted.tokenizer))
        return self._counter

    def count_tokens(self, texts: list[str], pairs_with: str | None = None) -> list[int] | None:
        counter = self._tokenizer()
        if counter is None:
            return None
        lock, tokenizer = counter
        with lock:
            if pairs_with is None:
                encoded = tokenizer(texts, add_special_tokens=True, truncation=False)
            else:
                encoded = tokenizer([pairs_with] * len(texts), texts, add_special_tokens=True,
                                    truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> list[Tokens] | None:
        counter = self._tokenizer()
        if counter is None or not getattr(counter[1], "is_fast", False):
            return None
        lock, tokenizer = counter
        with lock:
            encoded = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=False,
                                return_offsets_mapping=True, return_special_tokens_mask=True)
            words = [encoded.word_ids(i) for i in range(len(texts))]
            strings = [tokenizer.convert_ids_to_tokens(ids) for ids in encoded["input_ids"]]
        return [Tokens(ids, [tuple(span) for span in spans], w, names, [bool(m) for m in mask])
                for ids, spans, w, names, mask in zip(encoded["input_ids"],
                                                      encoded["offset_mapping"], words, strings,
                                                      encoded["special_tokens_mask"])]

    def decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str] | None:
        counter = self._tokenizer()
        if counter is None:
            return None
        lock, tokenizer = counter
        with lock:
            return tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    # --- token states (compat's "token states": the encoder outside infinity's batch loop) ---

    async def token_states(self, texts: list[str]) -> list[Any]:
        return await asyncio.to_thread(self._token_states_now, texts)

    def _token_states_now(self, texts: list[str]) -> list[Any]:
        encodings = [self._encoding(text, truncate=True) for text in texts]
        result = self._states([e.ids for e in encodings], [e.type_ids for e in encodings])
        return [np.array(result[j, :len(e.ids)], dtype=np.float32)
                for j, e in enumerate(encodings)]

    async def late_chunks(self, prefix: str, chunks: list[str]) -> LateChunks:
        return await asyncio.to_thread(self._late_chunks_now, prefix, chunks)

    def _late_chunks_now(self, prefix: str, chunks: list[str]) -> LateChunks:
        text = prefix + " ".join(chunks)
        window = self.info.window
        assert window is not None
        return late_chunking.embed(text, prefix, chunks, self._encoding(text, truncate=False),
                                   window, max(1, LATE_TOKENS_PER_CALL // window), self._states,
                                   model_config.normalizes(self.info.source),
                                   self.info.special_tokens)

    def _encoding(self, text: str, truncate: bool) -> Any:
        """One text's ids, token types, character spans and special-token mask, as the model's
        fast tokenizer gives them (cut at the window if `truncate`)."""
        counter = self._tokenizer()
        assert counter is not None
        lock, tokenizer = counter
        with lock:
            encoded = tokenizer(text, add_special_tokens=True, truncation=truncate,
                                max_length=self.info.window if truncate else None,
                                return_offsets_mapping=True, return_special_tokens_mask=True,
                                return_token_type_ids=True)
        ids = encoded["input_ids"]
        return SimpleNamespace(ids=ids, type_ids=encoded.get("token_type_ids") or [0] * len(ids),
                               offsets=[tuple(span) for span in encoded["offset_mapping"]],
                               special_tokens_mask=encoded["special_tokens_mask"])

    def _states(self, ids: list[list[int]], types: list[list[int]]) -> Any:
        """The encoder's token states of these rows, padded together."""
        assert self._adapted.token_states is not None
        width = max(map(len, ids))
        feed_ids = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        feed_types = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for j, (row, row_types) in enumerate(zip(ids, types)):
            feed_ids[j, :len(row)], feed_types[j, :len(row)], mask[j, :len(row)] = row, row_types, 1
        return self._adapted.token_states(feed_ids, feed_types, mask)

    @cached_property
    def _pad_id(self) -> int:
        pad = getattr(self._adapted.tokenizer, "pad_token_id", None)
        return pad if isinstance(pad, int) else 0

    def queue(self) -> QueueStats:
        status = self._engine.overload_status()
        return QueueStats(status.queue_fraction, status.queue_absolute, status.results_absolute)


class InfinityEngine(Engine):
    """The models torch (or CTranslate2) serves through infinity: GPUs, images, classifiers, and
    whatever the ONNX Runtime engine does not serve (`engine.combined` decides)."""

    def __init__(self, settings: Settings, specs: list[ModelSpec]):
        self.settings = settings
        self.specs = {spec.served_name: spec for spec in specs}
        self.state = "starting"
        self.failure = ""
        self.models = {}
        self._array: AsyncEngineArray | None = None

    @cached_property
    def device(self) -> str:
        """Where the models run; infinity leaves `auto` unresolved until torch picks."""
        if self.settings.device != "auto":
            return self.settings.device
        import torch

        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"

    def _engine_kwargs(self, spec: ModelSpec) -> dict[str, Any]:
        backend = self.settings.backend
        return dict(
            model_name_or_path=spec.source,
            served_model_name=spec.served_name,
            batch_size=spec.batch_size,
            engine="torch" if backend in ("auto", "optimum") else backend,
            dtype=spec.dtype,
            device=self.settings.device,
            model_warmup=self.settings.model_warmup,
            lengths_via_tokenize=True,  # usage counts real tokens
            bettertransformer=False,  # deprecated in optimum; plain SDPA is as fast
        )

    def load(self) -> None:
        if self._array is not None:
            return
        try:
            compat.check_modules()
            from infinity_emb import AsyncEngineArray, EngineArgs

            self._array = AsyncEngineArray.from_args(
                [EngineArgs(**self._engine_kwargs(spec)) for spec in self.specs.values()])
        except compat.IncompatibleInfinity as exc:
            compat.stop_process(exc)

    async def start(self) -> None:
        """Load weights in a worker thread (keeps /livez answering), then start the batch loops
        in the running event loop (infinity binds its queues to it). Called once, by
        `CombinedEngine.start`, which serialises concurrent starts."""
        if self.state == "starting":
            await self._start()

    async def _start(self) -> None:
        try:
            await asyncio.to_thread(self.load)
            assert self._array is not None
            await self._array.astart()
            models = {name: await self._adapt(name, self._array[name]) for name in self.specs}
        except compat.IncompatibleInfinity as exc:
            compat.stop_process(exc)  # not a model's fault: nothing may be served
        except Exception as exc:
            # Stay up and unready (503 with the reason) rather than crash-looping the worker.
            self.state = "failed"
            self.failure = one_line(exc)
            return
        self.models = models
        self.state = "ready"

    async def _adapt(self, name: str, engine: AsyncEmbeddingEngine) -> InfinityModel:
        guard = FaultGuard(name, Heartbeat(self.settings.engine_stall_timeout))
        adapted = compat.adapt(engine, cpu=self.device == "cpu", guard=guard)
        args, spec = engine.engine_args, self.specs[name]
        dimensions = None
        if "embed" in engine.capabilities:  # one short text: the size /v1/models shows
            vectors, _ = await engine.embed(sentences=["dimensions"])
            if not is_fault(vectors[0]):  # a model that fails on it is served all the same
                dimensions = len(vectors[0])
        tokenizer = adapted.tokenizer
        capabilities = set(engine.capabilities)
        pooling = model_config.pooling(spec.source)
        if adapted.token_states is not None and getattr(tokenizer, "is_fast", False):
            capabilities.add("token_embed")  # TEI's /embed_all
            if pooling == "mean":  # a chunk's vector is the mean of its own tokens' states
                capabilities.add("late_chunking")
        info = ModelInfo(
            name=name, source=spec.source, backend=args.engine.value,
            dtype=args.dtype.value, device=self.device, batch_size=args.batch_size,
            capabilities=frozenset(capabilities), window=adapted.window,
            dimensions=dimensions,
            special_tokens=tokenizer.num_special_tokens_to_add(pair=False)
            if hasattr(tokenizer, "num_special_tokens_to_add") else 0,
            raw_vectors=adapted.raw_vectors,
            # raw: a text embedder's own vectors are unit where its modules normalise; CLIP's are not
            unit_vectors=not adapted.raw_vectors or (
                "image_embed" not in engine.capabilities and model_config.normalizes(spec.source)),
            labels=adapted.labels,
            label_activation=adapted.label_activation, pooling=pooling,
        )
        return InfinityModel(engine, info, adapted, guard)

    async def stop(self) -> None:
        if self._array is not None and self.state == "ready":
            self.state = "stopped"
            await self._array.astop()
