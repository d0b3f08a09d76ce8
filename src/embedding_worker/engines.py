"""Infinity engines: built from Settings, started in the server's event loop, looked up by name."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from . import grouping, onnx_backend
from .config import Settings, onnx_cache_dir, prepare_infinity_environment, prepare_model_cache
from .engine_guard import EngineGuard
from .errors import BadRequest, ModelNotFound, Unavailable

if TYPE_CHECKING:  # infinity is imported lazily: it reads its environment at import time
    from infinity_emb import AsyncEmbeddingEngine, AsyncEngineArray

logger = logging.getLogger("embedding_worker")

CAPABILITY_WORDS = {
    "embed": "text embeddings",
    "image_embed": "image embeddings",
    "audio_embed": "audio embeddings",
    "rerank": "reranking",
    "classify": "classification",
}


class Engines:
    """The served models. Loading happens in `start`, never in `__init__` (probes must answer)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.specs = {spec.served_name: spec for spec in settings.models}
        self._array: AsyncEngineArray | None = None
        self.started_at = int(time.time())
        self.state = "starting"  # starting -> ready -> stopped | failed
        self.failure = ""
        self._lock: asyncio.Lock | None = None
        self.guards: dict[str, EngineGuard] = {}
        self.windows: dict[str, int | None] = {}  # tokens per input, special tokens included
        self._counters: dict[str, tuple[threading.Lock, Any]] = {}
        self._onnx: dict[str, onnx_backend.OnnxModel] = {}  # the models ONNX Runtime serves

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @cached_property
    def device(self) -> str:
        """Where the models run; infinity leaves `auto` unresolved until torch picks."""
        if self.settings.device != "auto":
            return self.settings.device
        import torch

        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def _engine_args(self) -> list[Any]:
        from infinity_emb import EngineArgs

        return [EngineArgs(**self._engine_kwargs(spec)) for spec in self.settings.models]

    def _engine_kwargs(self, spec: Any) -> dict[str, Any]:
        kwargs = dict(
            model_name_or_path=spec.source,
            served_model_name=spec.served_name,
            batch_size=spec.batch_size,
            engine="optimum" if spec.served_name in self._onnx else self._fallback_backend,
            dtype=spec.dtype,
            device=self.settings.device,
            model_warmup=self.settings.model_warmup,
            lengths_via_tokenize=True,  # usage counts real tokens
            bettertransformer=False,  # deprecated in optimum; plain SDPA is as fast
        )
        onnx = self._onnx.get(spec.served_name)
        if onnx is not None:
            # infinity's own graph optimisation fails under optimum 2.x and writes into the hub
            # cache (our export is fused instead); quantised files lose fidelity.
            kwargs.update(model_name_or_path=onnx.directory, pooling_method=onnx.pooling,
                          onnx_disable_optimize=True, onnx_do_not_prefer_quantized=True)
        return kwargs

    @property
    def _fallback_backend(self) -> str:
        """What serves a model ONNX Runtime does not (with BACKEND=optimum, none)."""
        return "torch" if self.settings.backend == "auto" else self.settings.backend

    def _prepare_onnx(self) -> dict[str, onnx_backend.OnnxModel]:
        """The models ONNX Runtime serves, exported if need be. BACKEND=optimum: all of them, or
        a load failure with the reason. BACKEND=auto: on a CPU, each text model in float32 that
        exports; any other (a GPU, an image model, an export that fails) is served by torch."""
        backend, models = self.settings.backend, self.settings.models
        if backend == "auto":
            if self.device != "cpu" or not onnx_backend.onnxruntime_installed():
                return {}
            models = tuple(spec for spec in models if spec.dtype in ("auto", "float32"))
        elif backend != "optimum":
            return {}
        if not models:
            return {}
        onnx_backend.require_onnxruntime()
        onnx_backend.onnx_file_names()
        cache = onnx_cache_dir(self.settings)
        prepared = {}
        for spec in models:
            try:
                prepared[spec.served_name] = onnx_backend.prepare(spec.source, cache)
            except Exception as exc:
                if backend == "optimum":
                    raise
                logger.info("model %s: served by torch, not ONNX Runtime: %s", spec.served_name,
                            _one_line(exc))
        return prepared

    def load(self) -> None:
        """Load the weights (slow, blocking). Idempotent; `start` calls it in a worker thread."""
        if self._array is not None:
            return
        for spec in self.settings.models:
            if spec.bundled:
                logger.info(
                    "MODEL_NAMES is unset: serving the bundled %s from %s (offline)",
                    spec.served_name,
                    spec.source,
                )
        prepare_infinity_environment(self.settings)
        prepare_model_cache(self.settings)
        self._onnx = self._prepare_onnx()
        from infinity_emb import AsyncEngineArray

        try:
            self._array = AsyncEngineArray.from_args(self._engine_args())
        except Exception as exc:
            if self.settings.backend != "auto" or not self._onnx:
                raise
            logger.warning("ONNX Runtime could not load the models, serving them all by torch: %s",
                           _one_line(exc))
            self._onnx = {}
            self._array = AsyncEngineArray.from_args(self._engine_args())

    async def start(self) -> None:
        """Load weights in a worker thread (keeps /livez answering), then start the batch loops
        in the running event loop (infinity binds its queues to it)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent first jobs (RunPod) start the engines once
            if self.state == "starting":
                await self._start()

    async def _start(self) -> None:
        try:
            await asyncio.to_thread(self.load)
            assert self._array is not None
            await self._array.astart()
        except Exception as exc:
            # Stay up and unready (503 with the reason) rather than crash-looping the worker.
            self.state = "failed"
            self.failure = _one_line(exc)
            logger.error("model loading failed, the service stays unready: %s", self.failure)
            return
        for name in self.names:
            engine = self._array[name]
            models = list(engine._model_replicas)  # infinity has no public handle on its models
            if name in self._onnx:  # mend the models before the guard wraps their stages
                for model in models:
                    onnx_backend.fit(model, self._onnx[name])
            if self.device == "cpu":
                for model in models:
                    grouping.group_batches(model)
            self.guards[name] = EngineGuard(name, models, self.settings.engine_stall_timeout)
            self.windows[name] = _window(models[0])
            _count_usage_as_truncated(models[0], self.windows[name])
            _no_result_delay(engine)
            args = engine.engine_args
            logger.info(
                "model %s: source=%s backend=%s dtype=%s device=%s batch_size=%d capabilities=%s%s",
                name,
                self.specs[name].source,
                args.engine.value,
                args.dtype.value,
                self.device,
                args.batch_size,
                ",".join(sorted(engine.capabilities)),
                f" onnx={args.model_name_or_path}" if name in self._onnx else "",
            )
        self.state = "ready"

    async def stop(self) -> None:
        if self._array is not None and self.state == "ready":
            self.state = "stopped"
            await self._array.astop()

    def get(self, name: str) -> AsyncEmbeddingEngine:
        if name not in self.specs:
            raise ModelNotFound(
                f"model {name!r} is not served here; available models: {', '.join(self.names)}",
                param="model",
            )
        if self.state == "failed":
            raise Unavailable(f"models failed to load: {self.failure}", code="load_failed")
        if not self.ready or self._array is None:
            raise Unavailable(f"model {name!r} is {self.state}; retry shortly")
        return self._array[name]

    def require(self, name: str, capability: str) -> AsyncEmbeddingEngine:
        """The engine for `name`, or a 400 naming the model and what it does support."""
        engine = self.get(name)
        if capability not in engine.capabilities:
            supported = ", ".join(CAPABILITY_WORDS[c] for c in sorted(engine.capabilities))
            raise BadRequest(
                f"model {name!r} does not support {CAPABILITY_WORDS[capability]}; "
                f"it supports: {supported}",
                param="model",
                code="capability_not_supported",
            )
        return engine

    async def score_pairs(self, name: str, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        """Raw relevance scores of (query, document) pairs in one call, whatever their queries,
        and infinity's token usage for them. infinity's public `rerank` takes one query per call;
        its batch handler takes any pairs (our batcher mixes requests to pad less)."""
        from infinity_emb.primitives import ReRankSingle

        engine = self.get(name)
        scores, usage = await engine._batch_handler._schedule(
            [ReRankSingle(query=query, document=document) for query, document in pairs])
        return list(scores), usage

    @property
    def stalled(self) -> list[str]:
        """Models whose batch loop has left work waiting past ENGINE_STALL_TIMEOUT."""
        return [name for name, guard in self.guards.items() if guard.stalled]

    def usage(self, name: str, texts: list[str]) -> int:
        """Tokens the model sees for `texts`, special tokens excluded: infinity's own count
        (capped at the window, see `_count_usage_as_truncated`). Blocking: call in a thread."""
        assert self._array is not None
        return int(sum(self._array[name]._model_replicas[0].tokenize_lengths(texts)))

    def count_tokens(self, name: str, texts: list[str], pairs_with: str | None = None) -> list[int] | None:
        """Tokens per text (or per `(pairs_with, text)` pair) as the model would see them before
        truncation, special tokens included; None when the model has no text tokenizer.
        Blocking: call in a thread. Uses its own tokenizer copy (fast tokenizers are not
        re-entrant) under a lock."""
        if name not in self._counters:
            tokenizer = _tokenizer(self._array[name]._model_replicas[0]) if self._array else None
            if tokenizer is None:
                return None
            self._counters.setdefault(name, (threading.Lock(), copy.deepcopy(tokenizer)))
        lock, tokenizer = self._counters[name]
        with lock:
            if pairs_with is None:
                encoded = tokenizer(texts, add_special_tokens=True, truncation=False)
            else:
                encoded = tokenizer([pairs_with] * len(texts), texts, add_special_tokens=True,
                                    truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def card(self, name: str) -> dict[str, Any]:
        engine = self.get(name)
        args = engine.engine_args
        status = engine.overload_status()
        return {
            "id": name,
            "object": "model",
            "owned_by": "infinity-embedding-worker",
            "created": self.started_at,
            "capabilities": sorted(engine.capabilities),
            "backend": args.engine.value,
            "dtype": args.dtype.value,
            "device": self.device,
            "batch_size": args.batch_size,
            "stats": {
                "queue_fraction": status.queue_fraction,
                "queue_absolute": status.queue_absolute,
                "results_pending": status.results_absolute,
            },
        }


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _tokenizer(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        tokenizer = getattr(getattr(model, "processor", None), "tokenizer", None)
    return tokenizer if callable(tokenizer) else None


def _window(model: Any) -> int | None:
    """The model's input window in tokens: what infinity truncates every text to."""
    for attr in ("max_seq_length", "max_length"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(_tokenizer(model), "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _no_result_delay(engine: Any) -> None:
    """infinity 0.0.78's post-processing thread sleeps `batch_delay` (5 ms) before finishing every
    batch that has no successor computed yet: its test `_last_inference < now + 2 * delay` is
    always true, so every request waited 5 ms more (a lone short text: 16.5 -> 11 ms in-process,
    docs/performance.md). With 0 it only yields; the put into its bounded queues still applies
    back-pressure. The publisher's own delay (another attribute) is left alone."""
    for worker in engine._batch_handler.model_worker:
        worker._batch_delay = 0


def _count_usage_as_truncated(model: Any, window: int | None) -> None:
    """infinity counts usage with a tokenizer copy that truncates at the tokenizer's own limit,
    which can exceed the model's window (MiniLM: 512 vs 256). Cap it at the window less the
    special tokens, so usage counts exactly the text tokens the model saw."""
    counter = getattr(model, "_infinity_tokenizer", None)
    if counter is None or window is None:
        return
    special = counter.num_special_tokens_to_add(pair=False)
    counter.model_max_length = max(1, window - special)
