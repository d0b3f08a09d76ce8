"""The lean CPU engine: text embedders and rerankers on ONNX Runtime (fp32) or OpenVINO (bf16 on
a CPU with AMX: `runtime`, guarded by `precision`), `tokenizers` and numpy.

It imports neither infinity_emb nor torch, transformers or sentence-transformers, which are
three quarters of a start (docs/performance.md). A model comes as an `onnx_export.OnnxPlan`
(its directory, pooling, window, whether it normalises); the export itself, which needs torch,
runs in a child process (`onnx_export.prepare`). Per batch: tokenise with the model's own
tokenizer.json, run the session in groups of similar length (`grouping`), pool as its
sentence-transformers config says, normalise where its modules do; a cross-encoder's score is its
logit. A batch that raises is redone item by item (`fault_guard`), so only the failing items'
requests fail. Models of outputs beyond one dense vector (SPLADE, BGE-M3, ColBERT) run in it on
torch too where torch serves (`runtime.TorchSession`): infinity has none of those outputs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, ModelSpec, Settings
from ..observability.logs import one_line
from . import late_chunking, model_config, precision, runtime
from .base import (Engine, Fault, Heartbeat, LateChunks, ModelBackend, ModelInfo, Query,
                   QueueStats, Rows, SparseRow, Tokens, tokens_of)
from .colbert import ColbertHeads, Encoded
from .fault_guard import FaultGuard
from .grouping import GROUP_TOKENS, token_groups
from .m3 import M3Heads
from .onnx_export import OnnxPlan, onnx_files
from .runtime import BF16, FP16, FP32, ONNXRUNTIME, TORCH, Choice, open_session, runtime_version

# A SPLADE model's token groups: its logits are a group's tokens x the vocabulary, 62.5 MB at this
# budget for BERT's (the default's 1,024: a 32 x 512-token batch peaked at 1,066 MB against 846,
# and ran no faster: docs/retrieval.md)
SPARSE_GROUP_TOKENS = 512
# the token counts of recently encoded short texts that `usage` reads: at most this many texts of
# at most this many characters (a few MB), forgotten all at once when full
COUNTS_KEPT, COUNTED_CHARS = 4096, 2000

logger = logging.getLogger("embedding_worker")


@dataclass(frozen=True)
class _Batch:
    """One batch, tokenised: its rows' ids and token types, unpadded (a ColBERT model's: as
    `engine.colbert` encodes them, some tokens not attended to)."""

    ids: list[list[int]]
    types: list[list[int]]
    colbert: list[Encoded] | None = None

    @property
    def attended(self) -> list[int] | None:
        return None if self.colbert is None else [text.attended for text in self.colbert]


class OrtModel(ModelBackend):
    """One model on its runtime (`runtime.choose`: ONNX Runtime fp32, or OpenVINO bf16)."""

    def __init__(self, spec: ModelSpec, plan: OnnxPlan, settings: Settings,
                 choice: Choice | None = None):
        from tokenizers import Tokenizer

        directory = Path(plan.directory)
        # the model's own files (a hub model's: its local copy)
        source = Path(plan.model_dir) if plan.model_dir else Path(spec.source)
        self.spec, self.plan = spec, plan
        choice = choice or Choice(ONNXRUNTIME, FP32, "ONNX Runtime")
        self.cross_encoder = plan.pooling == "auto"
        self.sparse = plan.splade
        if choice.runtime == TORCH:
            self.session = open_session(Path(), choice, source,
                                        "fill-mask" if self.sparse else "feature-extraction",
                                        settings.cpu_threads)
        else:
            files = onnx_files(directory)
            if not files:
                raise ConfigError(f"no .onnx file in {directory}")
            self.session = open_session(files[0], choice, threads=settings.cpu_threads)
        self.inputs = self.session.inputs
        self.group_tokens = SPARSE_GROUP_TOKENS if self.sparse else GROUP_TOKENS
        if choice.device != "cpu":  # a GPU: a batch in one call (the groups are for a CPU)
            self.group_tokens = 1 << 30
        tokenizer_file = _tokenizer_file(source, directory)
        # The tokenizer truncates at the window: the model's input, and every request's usage.
        # Counts past the window and /tokenize's full token lists need one that does not; it is
        # made at its first use (~8 MB a copy). Neither's settings change after this.
        self.tokenizer_file = tokenizer_file
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.colbert = (ColbertHeads(directory, self.tokenizer, [directory, source])
                        if plan.colbert else None)
        # a ColBERT model's window: a document's tokens before its marker goes in
        self.window = _window(str(source), directory, self.colbert.length(False) if self.colbert
                              else plan.window)
        self.tokenizer.enable_truncation(self.window)
        # the widest row the session gets (a ColBERT model's: its marker in, queries expanded)
        self.widest = (max(self.colbert.query_length, self.colbert.document_length)
                       if self.colbert else self.window)
        self._whole: Tokenizer | None = None
        self.pad_id = _pad_id(source, self.tokenizer)
        self.m3 = M3Heads(directory, self.tokenizer, [directory, source]) if plan.m3 else None
        self._counts: dict[str, int] = {}  # short text -> its tokens, from the model's encoding
        self._lock = threading.Lock()  # the session runs one batch at a time, on all cores
        self._whole_lock = threading.Lock()
        self.guard = FaultGuard(spec.served_name, Heartbeat(settings.engine_stall_timeout))
        self.heartbeat = self.guard.heartbeat
        self._pre, self._core, self._post = self.guard.guard_stages(self._encode, self._run,
                                                                    self._finish)
        self.special = self.tokenizer.num_special_tokens_to_add(is_pair=False)
        capabilities = ({"rerank"} if self.cross_encoder else {"sparse_embed"} if self.sparse
                        # a model of multi-vectors also reranks, by MaxSim (core.rerank)
                        else {"embed", "sparse_embed", "multi_embed", "rerank"} if self.m3
                        else {"multi_embed", "rerank"} if self.colbert
                        else {"embed"})
        if not (self.cross_encoder or self.sparse):  # its graph's output: the token states
            capabilities.add("token_embed")
        if plan.pooling == "mean":  # a chunk's vector is the mean of its own tokens' states
            capabilities.add("late_chunking")
        self.info = ModelInfo(
            name=spec.served_name, source=spec.source,
            backend="torch" if choice.runtime == TORCH else "optimum",
            dtype=choice.precision, runtime=choice.runtime, runtime_reason=choice.reason,
            device=choice.device,
            batch_size=spec.batch_size, capabilities=frozenset(capabilities),
            window=self.window, dimensions=None if self.cross_encoder else self._dimensions(),
            special_tokens=self.special,
            raw_vectors=True, unit_vectors=plan.normalizes or self.colbert is not None,
            pooling=(None if self.cross_encoder or self.colbert else plan.pooling if self.sparse
                     else model_config.pooling(spec.source)),
            # a ColBERT model encodes the texts of its "query" prompt as queries
            query_prompt="query" if self.colbert else None,
        )

    def because(self, reason: str) -> OrtModel:
        """This model, the reason for its runtime restated (the start-up line shows it)."""
        self.info = replace(self.info, runtime_reason=reason)
        return self

    def _dimensions(self) -> int:
        row = self._run(self._encode(["dimensions"]))[0]  # a SPLADE model's: its vocabulary
        return int((row.dense if self.m3 else row.multi if self.colbert else row).shape[-1])

    # --- the three stages (wrapped by the fault guard) ---

    def _encode(self, items: list[Any]) -> _Batch:
        """Texts, or (query, document) pairs: truncated longest-first, as transformers does."""
        encodings = self.tokenizer.encode_batch(items)
        counts = self._counts
        if len(counts) > COUNTS_KEPT:
            counts.clear()
        for item, encoding in zip(items, encodings):
            if isinstance(item, str) and len(item) <= COUNTED_CHARS:
                counts[item] = len(encoding.ids) - self.special  # as `usage` counts it
        if self.colbert is not None:  # queries (`Query`) and documents encoded apart
            texts = [self.colbert.encode(e.ids, e.type_ids, isinstance(item, Query))
                     for item, e in zip(items, encodings)]
            return _Batch([t.ids for t in texts], [t.types for t in texts], texts)
        return _Batch([e.ids for e in encodings], [e.type_ids for e in encodings])

    def _run(self, batch: _Batch) -> Any:
        """The session on groups of similar length, each padded to its own longest row: an array
        of a row per text (BGE-M3: a list of `MultiRow`s)."""
        lengths = [len(ids) for ids in batch.ids]
        out: np.ndarray | None = None
        several: list[Any] = [None] * len(lengths)
        for rows, result, mask in self._groups(batch):
            if self.colbert is not None:  # a vector per kept token
                assert batch.colbert is not None
                for i, row in zip(rows, self.colbert.rows(result, [batch.colbert[i] for i in rows])):
                    several[i] = row
                continue
            pooled = result[:, 0] if self.cross_encoder else self._pool(result, mask)
            if self.m3 is not None:  # its heads read the token states the pooling left
                for j, i in enumerate(rows):
                    several[i] = self.m3.row(pooled[j], result[j, :lengths[i]], batch.ids[i])
                continue
            if out is None:
                out = np.empty((len(lengths), *pooled.shape[1:]), dtype=np.float32)
            out[rows] = pooled
        if self.m3 is not None or self.colbert is not None:
            return several
        assert out is not None
        return out

    def _groups(self, batch: _Batch) -> Any:
        """(rows, the session's output, their mask) per group of similar length."""
        lengths = [len(ids) for ids in batch.ids]
        attended = batch.attended
        pad = lambda rows, width: self.session.shape(rows, width, self.widest)  # noqa: E731
        for rows in token_groups(lengths, self.group_tokens, pad):
            yield (rows, *self._forward([batch.ids[i] for i in rows],
                                        [batch.types[i] for i in rows],
                                        None if attended is None else [attended[i] for i in rows]))

    def _forward(self, ids: list[list[int]], types: list[list[int]],
                 attended: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The session's output for these rows, padded together, and their attention mask (on
        each row's first `attended` tokens; by default all of its own)."""
        lengths = [len(row) for row in ids]
        # the runtime may want a padded shape (OpenVINO: a few shapes, not every one)
        height, width = self.session.shape(len(ids), max(lengths), self.widest)
        feed_ids = np.full((height, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((height, width), dtype=np.int64)
        feed_types = np.zeros((height, width), dtype=np.int64)
        for j, n in enumerate(lengths):
            feed_ids[j, :n], feed_types[j, :n] = ids[j], types[j]
            mask[j, :n if attended is None else attended[j]] = 1
        feed = {"input_ids": feed_ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = feed_types
        with self._lock:
            result = self.session.run(feed)[: len(ids)]
        return result, mask[: len(ids)]

    def _pool(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pooling = self.plan.pooling
        if self.sparse:
            # SPLADE: log(1 + ReLU(logit)) per vocabulary entry, pooled over the text's tokens.
            # A group's logits are its tokens x the vocabulary (1,024 tokens of BERT's: 125 MB),
            # so nothing is copied: max pooling takes each row's maximum over its own tokens first
            # (log1p and ReLU are monotonic: the same result, on a row per text rather than per
            # token); sum pooling transforms in place
            lengths = mask.sum(1)
            if pooling == "splade-max":
                pooled = np.stack([tokens[j, :n].max(0) for j, n in enumerate(lengths)])
                return np.log1p(np.maximum(pooled, 0, out=pooled), out=pooled).astype(np.float32)
            np.maximum(tokens, 0, out=tokens)
            np.log1p(tokens, out=tokens)
            return np.stack([tokens[j, :n].sum(0) for j, n in enumerate(lengths)]).astype(np.float32)
        if pooling == "cls":
            pooled = tokens[:, 0]
        elif pooling == "last":
            pooled = tokens[np.arange(len(mask)), mask.sum(1) - 1]
        else:
            weights = mask[..., None].astype(tokens.dtype)
            pooled = (tokens * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
        if self.plan.normalizes:  # the model's own Normalize module
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            pooled = pooled / np.clip(norms, 1e-12, None)
        return pooled.astype(np.float32, copy=False)

    def _finish(self, out: Any) -> list[Any]:
        if self.m3 is not None or self.colbert is not None:
            return out
        if self.sparse:
            rows = []
            for row in out:
                indices = np.flatnonzero(row)
                rows.append(SparseRow(indices, row[indices]))
            return rows
        return list(out)

    # --- the seam ---

    def embed_now(self, items: list[Any]) -> list[Any]:
        return self._post(self._core(self._pre(items)))

    async def embed(self, texts: list[str]) -> Rows:
        # usage 0: the core counts each request's own (`usage`), as batches mix requests
        return await asyncio.to_thread(self.embed_now, texts), 0

    async def score(self, pairs: list[tuple[str, str]]) -> Rows:
        rows = await asyncio.to_thread(self.embed_now, pairs)
        return [row if isinstance(row, Fault) else float(row) for row in rows], 0

    async def embed_images(self, images: list[Any]) -> Rows:
        raise NotImplementedError("the ONNX Runtime engine serves text models only")

    async def classify(self, texts: list[str]) -> Rows:
        raise NotImplementedError("the ONNX Runtime engine serves no classifier")

    @property
    def last_fault(self) -> str:
        return self.guard.last_fault

    def usage(self, texts: list[str]) -> int:
        """Text tokens as the model saw them: special tokens excluded, cut at the window (without
        special tokens the truncating tokenizer cuts at the window itself). Texts the model has
        just encoded are counted from that encoding (`_encode`), not tokenised a second time on
        the event loop, whose CPU the model's threads need (docs/performance.md)."""
        counts = self._counts
        found = [counts.get(text) for text in texts]
        missing = [text for text, count in zip(texts, found) if count is None]
        total = sum(count for count in found if count is not None)
        if missing:
            encodings = self.tokenizer.encode_batch(missing, add_special_tokens=False)
            total += sum(min(len(e.ids), self.window - self.special) for e in encodings)
        return total

    async def token_states(self, texts: list[str]) -> list[Any]:
        return await asyncio.to_thread(self.token_states_now, texts)

    def token_states_now(self, texts: list[str]) -> list[Any]:
        batch = self._encode(texts)
        out: list[Any] = [None] * len(texts)
        for rows, result, _ in self._groups(batch):
            for j, i in enumerate(rows):
                out[i] = np.array(result[j, :len(batch.ids[i])], dtype=np.float32)
        return out

    async def late_chunks(self, prefix: str, chunks: list[str]) -> LateChunks:
        return await asyncio.to_thread(self.late_chunks_now, prefix, chunks)

    def late_chunks_now(self, prefix: str, chunks: list[str]) -> LateChunks:
        """Each token belongs to the chunk its text is in (`late_chunking.owners`); a document
        past the window is read in consecutive windows (`late_chunking.windows`), so a chunk
        sees the context of the window(s) its tokens are in."""
        text = prefix + " ".join(chunks)
        per_run = max(1, self.group_tokens // self.window)  # windows per session call
        return late_chunking.embed(text, prefix, chunks, self._untruncated().encode(text),
                                   self.window, per_run, self._states, self.plan.normalizes,
                                   self.special)

    def _states(self, ids: list[list[int]], types: list[list[int]]) -> np.ndarray:
        return self._forward(ids, types)[0]

    def _untruncated(self) -> Any:
        with self._whole_lock:
            if self._whole is None:
                from tokenizers import Tokenizer

                whole = Tokenizer.from_file(str(self.tokenizer_file))
                whole.no_padding()
                whole.no_truncation()
                self._whole = whole
            return self._whole

    def count_tokens(self, texts: list[str], pairs_with: str | None = None) -> list[int]:
        inputs = texts if pairs_with is None else [(pairs_with, t) for t in texts]
        return [len(e.ids) for e in self._untruncated().encode_batch(inputs)]

    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> list[Tokens]:
        return tokens_of(self._untruncated().encode_batch(
            texts, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.decode_batch(ids, skip_special_tokens=skip_special_tokens)

    def queue(self) -> QueueStats:
        return QueueStats(0.0, 0, 0)  # nothing waits here: the core's batchers hold the queue


class OrtEngine(Engine):
    """The models ONNX Runtime serves, each from its plan; or, with `torch_device`, models of
    several outputs on torch (`runtime.TorchSession`)."""

    def __init__(self, settings: Settings, plans: dict[str, OnnxPlan],
                 torch_device: str | None = None):
        self.settings = settings
        self.plans = plans
        self.torch_device = torch_device
        self.state, self.failure = "starting", ""
        self.models: dict[str, ModelBackend] = {}
        self.failed: dict[str, Exception] = {}  # models ONNX Runtime could not load

    def load(self) -> None:
        specs = {spec.served_name: spec for spec in self.settings.models}
        for name, plan in self.plans.items():
            if name in self.models or name in self.failed:
                continue
            try:
                spec = specs[name]
                if self.torch_device is not None:
                    self.models[name] = OrtModel(spec, plan, self.settings,
                                                 _torch_choice(spec, plan, self.torch_device))
                    continue
                choice = (runtime.for_this_cpu(spec.dtype) if self.settings.backend == "auto"
                          else Choice(ONNXRUNTIME, FP32, "BACKEND=optimum: ONNX Runtime"))
                if plan.pooling.startswith("splade"):
                    choice = Choice(ONNXRUNTIME, FP32, "sparse vectors in fp32: bf16 would move "
                                                       "which entries are non-zero")
                self.models[name] = self._open(spec, plan, choice)
            except Exception as exc:  # noqa: BLE001 - the caller decides: torch, or a failure
                self.failed[name] = exc

    def _open(self, spec: ModelSpec, plan: OnnxPlan, choice: Choice) -> OrtModel:
        """The model in its chosen precision; bf16 only if it keeps the model's numbers
        (`precision`), else fp32 (DTYPES=auto) or bf16 with a warning (DTYPES=bf16)."""
        def fp32(reason: str) -> OrtModel:
            return OrtModel(spec, plan, self.settings, Choice(ONNXRUNTIME, FP32, reason))

        if choice.runtime == ONNXRUNTIME:
            return OrtModel(spec, plan, self.settings, choice)
        directory, version = Path(plan.directory), runtime_version(choice.runtime)
        verdict = precision.kept_verdict(directory, version)
        if verdict is not None and not verdict.ok and spec.dtype != BF16:
            return fp32(f"bf16 would change its numbers ({verdict.detail})")  # nothing compiled
        try:
            model = OrtModel(spec, plan, self.settings, choice)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime may read what OpenVINO cannot
            return fp32(f"openvino could not compile it: {one_line(exc)}")
        reference: list[OrtModel] = []  # the probe's fp32 model, served if bf16 fails

        def run_fp32(items: list[Any]) -> list[Any]:
            reference.append(fp32(""))
            return dense(reference[0].embed_now(items))

        def dense(rows: list[Any]) -> list[Any]:
            if model.m3 is not None:  # BGE-M3: judged by its dense vectors
                return [row.dense for row in rows]
            if model.colbert is not None:  # ColBERT: by each text's vectors, end to end
                return [row if isinstance(row, Fault) else row.multi.ravel() for row in rows]
            return rows

        if verdict is None:
            verdict = precision.probe(directory, version, model.cross_encoder, run_fp32,
                                      lambda items: dense(model.embed_now(items)))
        if verdict.ok:
            return model.because(f"{choice.reason}; {verdict.detail}")
        if spec.dtype == BF16:
            logger.warning("model %s: bf16 changes its numbers (%s); served in bf16 as DTYPES "
                           "asks", spec.served_name, verdict.detail)
            return model.because(f"DTYPES asks for bf16; {verdict.detail}")
        reason = f"bf16 would change its numbers ({verdict.detail})"
        return reference[0].because(reason) if reference else fp32(reason)

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        self.state = "ready"

    async def stop(self) -> None:
        self.state = "stopped"


def _torch_choice(spec: ModelSpec, plan: OnnxPlan, device: str) -> Choice:
    """torch's precision for a model of several outputs: DTYPES' where it names one; for auto,
    float16 on a GPU (as infinity's auto), but float32 for a SPLADE model (its whole output is
    which entries are non-zero) and on a CPU."""
    why = "its outputs beyond a dense vector, which infinity lacks"
    if spec.dtype in (FP32, BF16, FP16):
        return Choice(TORCH, spec.dtype, f"torch: {why}; DTYPES asks for {spec.dtype}", device)
    if device == "cpu" or plan.splade:
        return Choice(TORCH, FP32, f"torch: {why}", device)
    return Choice(TORCH, FP16, f"torch: {why}", device)


def _tokenizer_file(source: Path, directory: Path) -> Path:
    for root in (directory, source):
        if (root / "tokenizer.json").is_file():
            return root / "tokenizer.json"
    raise ConfigError(f"no tokenizer.json in {directory} (the ONNX Runtime engine reads the "
                      f"model's fast tokenizer); use BACKEND=torch")


def _window(source: str, directory: Path, st_window: int | None) -> int:
    """What infinity's torch path truncates at: sentence-transformers' max_seq_length, else the
    tokenizer's limit, within the position embeddings (RoBERTa: 514 positions, 512 tokens)."""
    limits = [st_window]
    for name in ("tokenizer_config.json", "config.json"):
        path = directory / name if (directory / name).is_file() else Path(source) / name
        if path.is_file():
            config = json.loads(path.read_text())
            value = config.get("model_max_length" if name.startswith("tokenizer")
                               else "max_position_embeddings")
            if isinstance(value, int) and 0 < value < 1_000_000:
                limits.append(value)
    found = [limit for limit in limits if limit]
    if not found:
        raise ConfigError(f"{source}: no window (max_seq_length, model_max_length)")
    return min(found)


def _pad_id(directory: Path, tokenizer: Any) -> int:
    config = directory / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("pad_token_id")
        if isinstance(value, int):
            return value
    return tokenizer.token_to_id("[PAD]") or 0

