"""CLAP models (audio and text in one space) behind the engine seam, on the service's own torch
code (`engine.clap`), not infinity's CLAP path (docs/architecture.md says why).

A model whose config.json says `model_type: clap` is served here (`combined` decides), on the
device torch gets (`combined.device_hint`), in float32 unless DTYPES asks for float16 or
bfloat16. Texts and clips both come through the core's batchers, in batches of the model's
BATCH_SIZES. One forward pass at a time (its threads take every core); a batch that raises is
redone item by item (`fault_guard`), so only the failing items' requests fail.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from ..config import ConfigError, ModelSpec, Settings
from . import clap, onnx_export
from .base import Engine, Heartbeat, ModelBackend, ModelInfo, QueueStats, Rows, Tokens, tokens_of
from .fault_guard import FaultGuard
from .runtime import FP32


class ClapBackend(ModelBackend):
    def __init__(self, spec: ModelSpec, settings: Settings, device: str):
        from tokenizers import Tokenizer

        dtype = FP32 if spec.dtype == "auto" else spec.dtype
        if dtype not in clap.DTYPES:
            raise ConfigError(f"DTYPES={spec.dtype} for {spec.served_name}: a CLAP model runs in "
                              f"{', '.join(clap.DTYPES)}")
        directory = onnx_export.local_dir(spec.source, onnx_export.TORCH_FILES)
        self.clap = clap.Clap(directory, device, settings.cpu_threads, dtype)
        # a copy of its fast tokenizer that neither pads nor truncates: counts, /tokenize
        self._whole = Tokenizer.from_str(self.clap.tokenizer.backend_tokenizer.to_str())
        self._whole.no_padding()
        self._whole.no_truncation()
        self.special = self._whole.num_special_tokens_to_add(False)
        self._lock = threading.Lock()
        self.guard = FaultGuard(spec.served_name, Heartbeat(settings.engine_stall_timeout))
        self.heartbeat = self.guard.heartbeat
        self._texts = self._guarded(self.clap.embed_text)
        self._clips = self._guarded(self.clap.embed_audio)
        self.info = ModelInfo(
            name=spec.served_name, source=spec.source, backend="torch", dtype=dtype,
            device=device, batch_size=spec.batch_size,
            capabilities=frozenset({"embed", "audio_embed"}), window=self.clap.window,
            dimensions=self.clap.dimensions, special_tokens=self.special, raw_vectors=False,
            unit_vectors=True, sampling_rate=self.clap.rate)

    def _guarded(self, forward: Callable[[list[Any]], Any]) -> Callable[[list[Any]], list[Any]]:
        def locked(items: list[Any]) -> Any:
            with self._lock:
                return forward(items)

        pre, core, post = self.guard.guard_stages(lambda items: items, locked, list)
        return lambda items: post(core(pre(items)))

    async def embed(self, texts: list[str]) -> Rows:
        # usage 0: the core counts each request's own (`usage`), as batches mix requests
        return await asyncio.to_thread(self._texts, texts), 0

    async def embed_audio(self, clips: list[Any]) -> Rows:
        return await asyncio.to_thread(self._clips, clips), 0

    async def embed_images(self, images: list[Any]) -> Rows:
        raise NotImplementedError("a CLAP model embeds audio and text, not images")

    async def classify(self, texts: list[str]) -> Rows:
        raise NotImplementedError("a CLAP model does not classify")

    async def score(self, pairs: list[tuple[str, str]]) -> Rows:
        raise NotImplementedError("a CLAP model does not rerank")

    @property
    def last_fault(self) -> str:
        return self.guard.last_fault

    def usage(self, texts: list[str]) -> int:
        """Text tokens the model saw: special tokens excluded, cut at the window."""
        most = self.clap.window - self.special
        encodings = self._whole.encode_batch(texts, add_special_tokens=False)
        return sum(min(len(e.ids), most) for e in encodings)

    def count_tokens(self, texts: list[str], pairs_with: str | None = None) -> list[int]:
        inputs = texts if pairs_with is None else [(pairs_with, t) for t in texts]
        return [len(e.ids) for e in self._whole.encode_batch(inputs)]

    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> list[Tokens]:
        return tokens_of(self._whole.encode_batch(texts, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._whole.decode_batch(ids, skip_special_tokens=skip_special_tokens)

    def queue(self) -> QueueStats:
        return QueueStats(0.0, 0, 0)  # nothing waits here: the core holds the queue


class ClapEngine(Engine):
    def __init__(self, settings: Settings, specs: list[ModelSpec], device: str):
        self.settings, self.specs, self.device = settings, specs, device
        self.state, self.failure = "starting", ""
        self.models: dict[str, ModelBackend] = {}

    def load(self) -> None:
        for spec in self.specs:
            if spec.served_name not in self.models:
                self.models[spec.served_name] = ClapBackend(spec, self.settings, self.device)

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        self.state = "ready"

    async def stop(self) -> None:
        self.state = "stopped"
