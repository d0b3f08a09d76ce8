"""The engine seam: everything the core may ask of the models, and nothing more.

The core holds an `Engine` and its `ModelBackend`s and never an engine library's object. This
module imports no engine library, so the core can import it; `engine.infinity` implements it.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..observability.logs import one_line

# What a model can do; the core checks a request's needs against `ModelInfo.capabilities`.
CAPABILITIES = ("embed", "image_embed", "audio_embed", "rerank", "classify", "late_chunking",
                "sparse_embed", "multi_embed", "token_embed")


@dataclass(frozen=True)
class SparseRow:
    """A sparse vector (a SPLADE model's `embed` row): its non-zero entries, by vocabulary id."""

    indices: Any  # np.ndarray of int, ascending
    values: Any  # np.ndarray of float32, > 0


@dataclass(frozen=True)
class MultiRow:
    """The row of a model of several outputs (BGE-M3), all from one forward pass: its dense
    vector, its sparse one, and its multi-vector (tokens x dimensions, unit rows)."""

    dense: Any
    sparse: SparseRow
    multi: Any


class Query(str):
    """A text to encode as a query, for a model that encodes queries apart from documents
    (ColBERT: its query marker and query expansion); other models read it as any text."""

    __slots__ = ()


@dataclass(frozen=True)
class LateChunks:
    """One document's chunks embedded in context (`ModelBackend.late_chunks`): a row per chunk,
    how many of the document's tokens each pooled, and the document's tokens (special excluded)."""

    matrix: Any  # np.ndarray, float32
    counts: list[int]
    tokens: int


class Fault(float):
    """Result of one item the model raised on. A NaN float, so that score arithmetic (sigmoid,
    sorting) passes it through unchanged; the core turns it into a 500 for that item's request."""

    error: str

    def __new__(cls, error: BaseException) -> Fault:
        fault = super().__new__(cls, math.nan)
        fault.error = one_line(error)[:300]
        return fault


def is_fault(value: Any) -> bool:
    return isinstance(value, Fault) or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class ModelInfo:
    """What the core and `/v1/models` know of a started model."""

    name: str
    source: str
    backend: str  # what computes it: torch, optimum (ONNX Runtime), ctranslate2
    dtype: str
    device: str
    batch_size: int  # inputs per engine call
    capabilities: frozenset[str]
    window: int | None  # tokens per input, special tokens included; None: no text tokenizer
    dimensions: int | None = None  # of an embedding; None for a model that does not embed
    # from the model's config_sentence_transformers.json
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None
    special_tokens: int = 0  # tokens the tokenizer adds to one text ([CLS], [SEP])
    # True: `embed` gives the model's own vectors, unnormalised (the core normalises unless a
    # request asks for them raw); False: the engine can only give unit vectors
    raw_vectors: bool = False
    # the engine's rows are of unit length already (the model normalises, or the engine does):
    # the core then skips normalising them again
    unit_vectors: bool = True
    # a classifier's labels in the order of `classify`'s scores, and what turns its raw scores
    # into probabilities: "softmax" (one label per text) or "sigmoid" (each label on its own)
    labels: tuple[str, ...] = ()
    label_activation: str = "softmax"
    pooling: str | None = None  # an embedder's pooling (TEI's names: mean, cls, last_token)
    runtime: str | None = None  # the lean engine's: onnxruntime or openvino (engine.runtime)
    runtime_reason: str = ""  # why that runtime and precision (the start-up line)
    # the prompt whose texts the engine encodes as queries (`Query`; a ColBERT model: "query")
    query_prompt: str | None = None
    # an audio model's sampling rate: the core decodes clips to it (`embed_audio`)
    sampling_rate: int | None = None


@dataclass(frozen=True)
class Tokens:
    """One text's tokens: ids, character spans, and the word each token belongs to (None for
    none), as the model's fast tokenizer gives them; each token's string and whether it is a
    special token (only there when asked for)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    words: list[int | None]
    strings: list[str]
    special: list[bool]


def tokens_of(encodings: list[Any]) -> list[Tokens]:
    """`Tokens` of a fast tokenizer's encodings (`tokenizers.Encoding`)."""
    return [Tokens(e.ids, list(e.offsets), list(e.word_ids), list(e.tokens),
                   [bool(m) for m in e.special_tokens_mask]) for e in encodings]


@dataclass(frozen=True)
class QueueStats:
    queue_fraction: float
    queue_absolute: int
    results_pending: int


class Heartbeat:
    """Progress of one model's batch loop, so that `/readyz` can tell a stalled loop from a busy
    one. The core reports work submitted and finished (event loop thread); the engine reports
    each finished batch (`beat`, from its own thread: it only writes `last_batch`)."""

    def __init__(self, stall_timeout: float):
        self.stall_timeout = stall_timeout
        self.last_batch = time.monotonic()
        self.pending = 0  # engine calls awaiting results
        self.batches = 0  # batches finished, for tests and diagnostics
        self._unserved_since: float | None = None  # oldest work no finished batch came after

    def submitted(self) -> None:
        self.pending += 1
        if self._unserved_since is None:
            self._unserved_since = time.monotonic()

    def finished(self, *, abandoned: bool = False) -> None:
        """`abandoned`: the caller went away; the engine skips its queued items, so no batch may
        follow, and that is no evidence of a stall. (A deadline that expired is evidence.)"""
        self.pending -= 1
        if abandoned and self.pending == 0:
            self._unserved_since = None

    def beat(self) -> None:
        self.batches += 1
        self.last_batch = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds that submitted work has waited without any batch finishing (0 if none)."""
        since = self._unserved_since
        if since is None:
            return 0.0
        if self.last_batch >= since:  # a batch finished since: progress
            if self.pending == 0:
                self._unserved_since = None
                return 0.0
            self._unserved_since = since = self.last_batch
        return time.monotonic() - since

    @property
    def stalled(self) -> bool:
        return self.stalled_for() > self.stall_timeout


# one result per input (a `Fault` where the model failed), and the tokens used: 0 where the
# engine does not count them (the core counts each request's own with `usage`)
Rows = tuple[list[Any], int]


class ModelBackend(ABC):
    """One started model. Results come back in input order; an item the model failed on gets a
    `Fault` (or NaN) in its place, and only the requests owning such items fail."""

    info: ModelInfo
    heartbeat: Heartbeat

    @property
    @abstractmethod
    def last_fault(self) -> str:
        """The reason of the latest fault (scores can lose the `Fault` type in arithmetic)."""

    @abstractmethod
    async def embed(self, texts: list[str]) -> Rows:
        """One vector per text (a float array): the model's own, unnormalised where
        `info.raw_vectors`, else of unit length."""

    @abstractmethod
    async def embed_images(self, images: list[Any]) -> Rows:
        """One vector per decoded RGB image, as `embed` gives them."""

    async def embed_audio(self, clips: list[Any]) -> Rows:
        """One vector per clip (`audio_embed` in `info.capabilities`): float32 samples, one
        channel at `info.sampling_rate`, as `embed` gives them."""
        raise NotImplementedError(f"model {self.info.name!r} does not embed audio")

    @abstractmethod
    async def classify(self, texts: list[str]) -> Rows:
        """The raw score (logit) of every label per text, in the order of `info.labels`."""

    @abstractmethod
    async def score(self, pairs: list[tuple[str, str]]) -> Rows:
        """The raw relevance score of each (query, document) pair, whatever their queries."""

    @abstractmethod
    def usage(self, texts: list[str]) -> int:
        """Tokens the model sees for `texts` (truncated to the window), special tokens excluded.
        Blocking: call it in a thread for long inputs."""

    @abstractmethod
    def count_tokens(self, texts: list[str], pairs_with: str | None = None) -> list[int] | None:
        """Tokens per text (or per `(pairs_with, text)` pair) before truncation, special tokens
        included; None when the model has no text tokenizer. Blocking, thread-safe."""

    @abstractmethod
    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> list[Tokens] | None:
        """Each text's tokens (no truncation); None without a fast text tokenizer. Blocking,
        thread-safe."""

    @abstractmethod
    def decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str] | None:
        """The text of each token-id sequence; None without a text tokenizer. Blocking,
        thread-safe."""

    async def late_chunks(self, prefix: str, chunks: list[str]) -> LateChunks:
        """Late chunking (`late_chunking` in `info.capabilities`): the chunks of one document,
        joined with a space after `prefix`, read in context; each chunk's vector the mean of its
        own tokens' states."""
        raise NotImplementedError(f"model {self.info.name!r} does not do late chunking")

    async def token_states(self, texts: list[str]) -> list[Any]:
        """Each text's last hidden states, a row per token, special tokens included
        (`token_embed` in `info.capabilities`: TEI's `/embed_all`)."""
        raise NotImplementedError(f"model {self.info.name!r} gives no token states")

    @abstractmethod
    def queue(self) -> QueueStats:
        """What waits in the engine's own queue."""


class Engine(ABC):
    """The served models: loaded in `load` (blocking, slow), started in `start` in the serving
    event loop. Never loads in `__init__`: probes must answer meanwhile."""

    state: str  # starting -> ready -> stopped | failed
    failure: str  # why it failed, in one line
    models: dict[str, ModelBackend]  # filled once ready

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @abstractmethod
    def load(self) -> None:
        """Load the weights. Idempotent; raises on a load failure."""

    def preload(self) -> None:
        """Begin `load` in the background, where the engine can (`load` then waits for it)."""

    @abstractmethod
    async def start(self) -> None:
        """Load (in a thread) and start the batch loops; idempotent and safe to call
        concurrently. A load failure leaves `state == "failed"` with the reason."""

    @abstractmethod
    async def stop(self) -> None: ...
