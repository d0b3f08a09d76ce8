"""Every touch of infinity-emb's internals, checked before it is made.

infinity-emb is pinned (0.0.78). The service relies on eight things it does not offer publicly;
each is listed in `WORKAROUNDS` with what it is for, and docs/architecture.md says how to drop it
once infinity fixes it. Before any is applied, `check_modules` and `adapt` look up every attribute
they will read or replace and check its type; a missing or changed one raises
`IncompatibleInfinity`, which stops the process with one line naming it (an upgrade must fail at
start-up, never serve silently different numbers). Nothing outside this module reads an infinity
attribute that starts with an underscore or replaces one of its methods.

One more library's internals are touched, here too: transformers' CLAP feature extractor (see
`clap_input_mel`, for engine/clap.py).
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from . import grouping
from .fault_guard import FaultGuard

logger = logging.getLogger("embedding_worker")

WRITTEN_FOR = "0.0.78"

# name -> what it is for (the docs hold the why and how to drop each)
WORKAROUNDS = {
    "fault containment": "an exception in a model stage kills infinity's batch thread",
    "cpu grouping": "infinity pads a whole batch to its longest text",
    "usage as truncated": "the torch classes count usage past the model's window",
    "no result delay": "infinity's post-processing thread sleeps 5 ms after most batches",
    "pair scoring": "the public rerank takes one query per call; batches mix queries",
    "raw vectors": "infinity normalises every embedding; a request may ask for the model's own",
    "classifier logits": "infinity's classifier gives softmax scores sorted by score (its "
                         "raw_scores does nothing)",
    "token states": "infinity gives pooled vectors only; late chunking and TEI's /embed_all "
                    "read the encoder's token states",
}


class IncompatibleInfinity(RuntimeError):
    """infinity-emb lacks, or changed, something a workaround touches."""


EXIT_INCOMPATIBLE = 3


def stop_process(exc: IncompatibleInfinity) -> NoReturn:
    """One line, then the process ends: no request may be served on an infinity that the
    workarounds do not fit. (Under `bentoml serve` the arbiter starts the worker again, which
    stops again: the server never becomes ready.)"""
    logger.critical("stopping: %s", exc)
    logging.shutdown()
    os._exit(EXIT_INCOMPATIBLE)


_MISSING = object()


def _need(owner: Any, attr: str, expect: type | tuple[type, ...] | str, workaround: str) -> Any:
    """`owner.attr`, which must exist and be of the kind `expect` ("callable", "coroutine", or
    types); otherwise one line that names the attribute and the workaround."""
    value = getattr(owner, attr, _MISSING)
    where = f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
    if value is _MISSING:
        found = "is missing"
    elif expect == "callable":
        found = None if callable(value) else f"is a {type(value).__name__}, not callable"
    elif expect == "coroutine":
        found = None if inspect.iscoroutinefunction(value) else "is not a coroutine function"
    elif isinstance(value, expect) and not isinstance(value, bool):  # type: ignore[arg-type]
        found = None
    else:
        found = f"is a {type(value).__name__}"
    if found is not None:
        raise IncompatibleInfinity(
            f"infinity-emb {_version()}: {where} {found}; the {workaround!r} workaround "
            f"({WORKAROUNDS[workaround]}) was written for infinity-emb {WRITTEN_FOR}"
        )
    return value


def _version() -> str:
    from importlib.metadata import version

    return version("infinity_emb")


# --- module-level: before the engines are built ---


def check_modules() -> None:
    """What must be there before loading: the classes the model-level workarounds recognise and
    the primitive pair scoring builds."""
    if _version() != WRITTEN_FOR:
        logger.warning("infinity-emb %s is installed; this service was written for %s",
                       _version(), WRITTEN_FOR)
    _text_classes()
    from infinity_emb import primitives

    _need(primitives, "ReRankSingle", type, "pair scoring")


def _text_classes() -> dict[str, tuple[type, ...]]:
    """infinity's model classes the workarounds know: the text embedder and cross-encoder, the
    classifier and the CLIP-like model (torch all)."""
    from infinity_emb.transformer.classifier.torch import SentenceClassifier
    from infinity_emb.transformer.crossencoder.torch import CrossEncoderPatched
    from infinity_emb.transformer.embedder.sentence_transformer import SentenceTransformerPatched
    from infinity_emb.transformer.vision.torch_vision import TIMM

    return {"text": (SentenceTransformerPatched, CrossEncoderPatched),
            "st_embedder": (SentenceTransformerPatched,),
            "classifier": (SentenceClassifier,), "clip": (TIMM,)}


# --- per engine: after it is built, before its batch loop serves ---


@dataclass
class Adapted:
    """What the infinity backend needs of one started engine beyond its public methods."""

    window: int | None
    tokenizer: Any | None  # the model's own tokenizer (count_tokens), None without text
    usage: Callable[[list[str]], list[int]]  # text tokens per text, as the model saw them
    score: Callable[[list[tuple[str, str]]], Any]  # awaitable (scores, usage) for any pairs
    raw_vectors: bool = False  # its embeddings come unnormalised ("raw vectors")
    labels: tuple[str, ...] = ()  # a classifier's, in the order of its logits
    label_activation: str = "softmax"
    # a text embedder's encoder alone: padded (ids, token types, mask) arrays -> its token
    # states, float32 rows x tokens x hidden ("token states"); None for other models
    token_states: Callable[[Any, Any, Any], Any] | None = None


def adapt(engine: Any, *, cpu: bool, guard: FaultGuard) -> Adapted:
    """Check every attribute the workarounds need on `engine` and its models, then apply them.
    The order matters: the model's own stage replacements (raw vectors, classifier logits) come
    first; grouping wraps the encoder stage; the fault guard wraps all three last, so that it
    sees (and contains) what the others do; the usage cap reads the final window."""
    replicas = _need(engine, "_model_replicas", list, "fault containment")
    if not replicas:
        raise IncompatibleInfinity("infinity-emb: AsyncEmbeddingEngine._model_replicas is empty")
    handler = _need(engine, "_batch_handler", object, "pair scoring")
    schedule = _need(handler, "_schedule", "coroutine", "pair scoring")
    workers = _need(handler, "model_worker", list, "no result delay")
    for worker in workers:
        _need(worker, "_batch_delay", float, "no result delay")
    classes = _text_classes()
    text = classes["text"]
    for model in replicas:
        for stage in ("encode_pre", "encode_core", "encode_post"):
            _need(model, stage, "callable", "fault containment")
        if isinstance(model, text):
            _need(model, "_infinity_tokenizer", object, "usage as truncated")
            _need(model, "tokenizer", object, "usage as truncated")

        if isinstance(model, classes["classifier"]):
            _need(model, "_pipe", object, "classifier logits")
            _need(model, "_infinity_tokenizer", object, "usage as truncated")
            _need(model._pipe, "tokenizer", object, "classifier logits")
            _need(model._pipe, "model", object, "classifier logits")
        if isinstance(model, classes["clip"]):
            _need(model, "_normalize_cpu", "callable", "raw vectors")

    raw_vectors, labels = False, None
    for model in replicas:
        raw_vectors = _unnormalised(model, classes)
        if isinstance(model, classes["classifier"]):
            labels = _classifier_logits(model)
        if cpu and _groupable(model, text):
            model.encode_core = grouping.grouped(model.encode_core)
        model.encode_pre, model.encode_core, model.encode_post = guard.guard_stages(
            model.encode_pre, model.encode_core, model.encode_post)
    first = replicas[0]
    tokenizer = _tokenizer(first) if labels is None else first._pipe.tokenizer
    window = _window(first) if labels is None else _tokenizer_limit(tokenizer)
    if isinstance(first, text) and window is None:
        raise IncompatibleInfinity(
            f"infinity-emb {_version()}: {type(first).__name__} has no max_seq_length or "
            f"max_length; truncation checks and usage need the model's window")
    for model in replicas:
        _count_usage_as_truncated(model, window)
        if labels is not None:  # its own count does not truncate
            model.tokenize_lengths = types.MethodType(_text_tokens, model)
    for worker in workers:
        # infinity's post-processing thread sleeps `batch_delay` (5 ms) before finishing every
        # batch that has no successor computed yet: its test `_last_inference < now + 2 * delay`
        # is always true, so every request waited 5 ms more (a lone short text: 16.5 -> 11 ms
        # in-process, docs/performance.md). With 0 it only yields; the put into its bounded
        # queues still applies back-pressure. The publisher's own delay is left alone.
        worker._batch_delay = 0.0

    from infinity_emb.primitives import ReRankSingle

    def score(pairs: list[tuple[str, str]]) -> Any:
        return schedule([ReRankSingle(query=q, document=d) for q, d in pairs])

    names, activation = labels or ((), "softmax")
    return Adapted(window=window, tokenizer=tokenizer, usage=first.tokenize_lengths, score=score,
                   raw_vectors=raw_vectors, labels=names, label_activation=activation,
                   token_states=_token_states(first, classes))


def _unnormalised(model: Any, classes: dict[str, tuple[type, ...]]) -> bool:
    """Make the model's embeddings come as the model computes them, its own Normalize module
    included (the core normalises them unless a request asks otherwise); False for a class this
    does not know."""
    if isinstance(model, classes["st_embedder"]):
        if getattr(model, "mode_colbert", False):
            return False
        if not isinstance(getattr(model, "normalize_embeddings", None), bool):
            raise IncompatibleInfinity(
                f"infinity-emb {_version()}: {type(model).__name__}.normalize_embeddings is not "
                f"a bool; the 'raw vectors' workaround was written for infinity-emb {WRITTEN_FOR}")
        model.normalize_embeddings = False
        return True
    if isinstance(model, classes["clip"]):
        normalise = model._normalize_cpu
        model._normalize_cpu = lambda tensor, normalize: normalise(tensor, False)
        return True
    return False


def _token_states(model: Any, classes: dict[str, tuple[type, ...]]) -> Callable | None:
    """The encoder of a sentence-transformers embedder (its first module, the Transformer)
    run on its own, outside infinity's batch loop (torch's inference is re-entrant); None for
    any other model, and for ColBERT (infinity's own token mode)."""
    if not isinstance(model, classes["st_embedder"]) or getattr(model, "mode_colbert", False):
        return None
    _need(model, "__getitem__", "callable", "token states")
    _need(model, "device", object, "token states")
    encoder = model[0]
    auto_model = _need(encoder, "auto_model", object, "token states")
    import torch

    typed = "token_type_ids" in inspect.signature(auto_model.forward).parameters

    def states(ids: Any, types: Any, mask: Any) -> Any:
        features = {"input_ids": ids, "attention_mask": mask, **({"token_type_ids": types}
                                                                 if typed else {})}
        features = {k: torch.from_numpy(v).to(model.device) for k, v in features.items()}
        with torch.inference_mode():
            return encoder(features)["token_embeddings"].float().cpu().numpy()

    return states


def _classifier_logits(model: Any) -> tuple[tuple[str, ...], str]:
    """Make the classifier's rows its raw scores in label order (infinity's pipeline call
    applies softmax and sorts by score); its labels, and the activation the transformers
    pipeline would apply (sigmoid for one label or multi-label models)."""
    import numpy as np

    pipe = model._pipe
    config = pipe.model.config
    id2label = {int(i): str(label) for i, label in config.id2label.items()}
    labels = tuple(id2label[i] for i in sorted(id2label))
    multi = getattr(config, "problem_type", None) == "multi_label_classification"
    activation = "sigmoid" if multi or len(labels) == 1 else "softmax"

    def logits(sentences: list[str]) -> list[Any]:
        # as infinity's own call, but no function applied
        return pipe(sentences, batch_size=256, truncation=True, padding=True,
                    function_to_apply="none")

    def in_label_order(rows: list[list[dict[str, Any]]]) -> list[Any]:
        out = []
        for row in rows:
            by_label = {entry["label"]: entry["score"] for entry in row}
            out.append(np.array([by_label[label] for label in labels], dtype=np.float32))
        return out

    model.encode_core, model.encode_post = logits, in_label_order
    return labels, activation


def _tokenizer_limit(tokenizer: Any) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _groupable(model: Any, text: tuple[type, ...]) -> bool:
    """Grouping cuts each group's padding on the right: only infinity's own text classes padded
    that way, and not ColBERT (its token vectors are the output)."""
    if type(model) not in text or getattr(model, "mode_colbert", False):
        return False
    return getattr(model.tokenizer, "padding_side", "right") == "right"


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
    return _tokenizer_limit(_tokenizer(model))


def _count_usage_as_truncated(model: Any, window: int | None) -> None:
    """infinity counts usage with a tokenizer copy that truncates at the tokenizer's own limit,
    which can exceed the model's window (MiniLM: 512 vs 256). Cap it at the window less the
    special tokens, so usage counts exactly the text tokens the model saw."""
    counter = getattr(model, "_infinity_tokenizer", None)  # required of `text` (see `adapt`)
    if counter is None or window is None:
        return
    special = counter.num_special_tokens_to_add(pair=False)
    counter.model_max_length = max(1, window - special)


def _text_tokens(self: Any, texts: list[str]) -> list[int]:
    encoded = self._infinity_tokenizer(texts, add_special_tokens=False, padding=False,
                                       truncation=True)
    return [len(ids) for ids in encoded["input_ids"]]


# --- transformers' CLAP feature extractor (engine/clap.py) ------------------------------------

CLAP_EXTRACTOR = ("_get_input_mel", "_np_extract_fbank_features", "_random_mel_fusion")


def clap_input_mel(extractor: Any, windows: Callable) -> Callable[[Any, int], tuple[Any, bool]]:
    """The extractor's one-clip path (a clip's model input, and whether it counts as long), with
    `windows(mel, total_frames, chunk_frames)` in place of its random draw of a long clip's three
    windows. Its methods are checked first (transformers 4.57's): a change fails the model's load."""
    missing = [name for name in CLAP_EXTRACTOR if not callable(getattr(extractor, name, None))]
    if missing:
        raise RuntimeError(f"transformers' ClapFeatureExtractor has no {', '.join(missing)}: "
                           "engine/compat.py's CLAP part needs updating for this transformers")
    extractor._random_mel_fusion = windows

    def input_mel(wave: Any, max_samples: int) -> tuple[Any, bool]:
        return extractor._get_input_mel(wave, max_samples, extractor.truncation,
                                        extractor.padding)

    return input_mel
