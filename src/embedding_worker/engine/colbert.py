"""ColBERT models on the CPU engine: a multi-vector (one unit vector per kept token) from the
encoder's token states, a query encoded apart from a document, as PyLate encodes them.

Two formats: PyLate's (sentence-transformers modules Transformer + Dense projection(s); markers,
lengths and skiplist in config_sentence_transformers.json) and Stanford's `HF_ColBERT` (a BERT
whose `linear` projects; `artifact.metadata` beside). As PyLate's `ColBERT.encode`:
- the text is cut to the role's length less one and its marker ([Q] / [D], a token id) goes
  in after the first token;
- a query is padded to `query_length` with the mask token (query expansion), which the other
  tokens attend to only if `attend_to_expansion_tokens`; all its rows are kept;
- a document keeps the rows of its tokens that are not in the skiplist (punctuation);
- rows are the projected states, each of unit length.
The projections are exported to numpy (`HEADS_FILE`, by `onnx_export`), so serving needs no torch.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError
from .base import MultiRow

HEADS_FILE = "colbert_heads.npz"
SETTINGS_FILE = "colbert.json"  # what `settings` read, beside the export
ST_CONFIG = "config_sentence_transformers.json"
STANFORD_METADATA = "artifact.metadata"
# PyLate's defaults where a model's files say nothing
DEFAULTS = {"query_length": 32, "document_length": 180, "do_query_expansion": True,
            "attend_to_expansion_tokens": False}
IDENTITY = "torch.nn.modules.linear.Identity"


def is_stanford(config: dict) -> bool:
    return (config.get("architectures") or [None])[0] == "HF_ColBERT"


def dense_modules(model_dir: Path) -> list[str] | None:
    """The paths of a PyLate model's Dense modules, in order; None for a model that is not one
    (no modules.json, or no ColBERT config). Refuses what the ONNX path would get wrong."""
    modules_file, config_file = model_dir / "modules.json", model_dir / ST_CONFIG
    if not modules_file.is_file() or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "ColBERT" and "query_prefix" not in config:
        return None
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:1] != ["Transformer"] or set(kinds[1:]) - {"Dense"}:
        raise ConfigError(f"BACKEND=optimum: {model_dir} is a ColBERT model with modules "
                          f"{', '.join(kinds)}; the ONNX path serves Transformer + Dense only")
    paths = [m.get("path", "") for m in modules[1:]]
    for path in paths:
        layer = json.loads((model_dir / path / "config.json").read_text())
        if layer.get("activation_function", IDENTITY) != IDENTITY or layer.get("use_residual"):
            raise ConfigError(f"BACKEND=optimum: {model_dir}'s {path} projects with "
                              f"{layer.get('activation_function')} (residual: "
                              f"{bool(layer.get('use_residual'))}); the ONNX path serves linear "
                              f"projections only")
    return paths


def settings(model_dir: Path, stanford: bool) -> dict[str, Any]:
    """Markers, lengths, expansion and skiplist as PyLate reads them for this model."""
    found: dict[str, Any] = {}
    if stanford:
        metadata = model_dir / STANFORD_METADATA
        meta = json.loads(metadata.read_text()) if metadata.is_file() else {}
        found = {"query_prefix": meta.get("query_token_id", "[unused0]"),
                 "document_prefix": meta.get("doc_token_id", "[unused1]"),
                 "query_length": meta.get("query_maxlen"),
                 "document_length": meta.get("doc_maxlen"),
                 "attend_to_expansion_tokens": meta.get("attend_to_mask_tokens")}
    else:
        config = json.loads((model_dir / ST_CONFIG).read_text())
        found = {key: config.get(key) for key in (
            "query_prefix", "document_prefix", "query_length", "document_length",
            "do_query_expansion", "attend_to_expansion_tokens", "skiplist_words")}
        found["query_prefix"] = found["query_prefix"] if found["query_prefix"] is not None else "[Q] "
        found["document_prefix"] = (found["document_prefix"] if found["document_prefix"] is not None
                                    else "[D] ")
    out = {**DEFAULTS, "skiplist_words": list(string.punctuation)}
    out.update({key: value for key, value in found.items() if value is not None})
    if not out["do_query_expansion"]:
        out["attend_to_expansion_tokens"] = False
    return out


@dataclass(frozen=True)
class Encoded:
    """One text as the encoder gets it: its ids and token types, how many of them are attended
    (the rest: query expansion), and whether it is a query."""

    ids: list[int]
    types: list[int]
    attended: int
    query: bool


class ColbertHeads:
    def __init__(self, directory: Path, tokenizer: Any, sources: list[Path]):
        """`directory`: the export (heads, settings); `sources`: where its tokenizer's files are."""
        config = json.loads((directory / SETTINGS_FILE).read_text())
        heads = np.load(directory / HEADS_FILE)
        self.layers = [(np.ascontiguousarray(heads[f"{i}.weight"].T),
                        heads[f"{i}.bias"] if f"{i}.bias" in heads else None)
                       for i in range(config["layers"])]
        self.dimensions = int(self.layers[-1][0].shape[1])
        self.query_length = int(config["query_length"])
        self.document_length = int(config["document_length"])
        self.expansion = bool(config["do_query_expansion"])
        self.attend_expansion = bool(config["attend_to_expansion_tokens"])
        self.prefixes = {}
        for role in ("query", "document"):
            marker = config[f"{role}_prefix"]
            self.prefixes[role] = None if marker == "" else _id(tokenizer, marker, role)
        # as PyLate: queries are expanded with the mask token (a decoder's: its end token)
        expansion = _special(sources, tokenizer, ("mask_token", "eos_token", "pad_token"))
        if expansion is None:
            raise ConfigError("the ColBERT model's tokenizer has no mask, end or pad token to "
                              "expand queries with")
        self.expansion_id = expansion
        unknown = _special(sources, tokenizer, ("unk_token",))
        # as PyLate: a skiplist word not in the vocabulary stands for the unknown token
        self.skiplist = {tokenizer.token_to_id(word) if tokenizer.token_to_id(word) is not None
                         else unknown for word in config["skiplist_words"]} - {None}

    def length(self, query: bool) -> int:
        """Tokens of a text before its marker goes in (special tokens included)."""
        length = self.query_length if query else self.document_length
        return length - 1 if self.prefixes["query" if query else "document"] is not None else length

    def encode(self, ids: list[int], types: list[int], query: bool) -> Encoded:
        """`ids`: the text's tokens, special tokens included, cut at the document length."""
        limit = self.length(query)
        if len(ids) > limit:  # cut as the tokenizer cuts: the last (special) token stays
            ids, types = ids[:limit - 1] + ids[-1:], types[:limit - 1] + types[-1:]
        marker = self.prefixes["query" if query else "document"]
        if marker is not None:
            ids, types = [ids[0], marker, *ids[1:]], [types[0], 0, *types[1:]]
        attended = len(ids)
        if query and self.expansion and len(ids) < self.query_length:
            pad = self.query_length - len(ids)
            ids, types = ids + [self.expansion_id] * pad, types + [0] * pad
            if self.attend_expansion:
                attended = len(ids)
        return Encoded(ids, types, attended, query)

    def rows(self, states: np.ndarray, texts: list[Encoded]) -> list[MultiRow]:
        """`states`: a group's token states (texts x tokens x hidden), padded."""
        projected = states
        for weight, bias in self.layers:
            projected = projected @ weight
            if bias is not None:
                projected = projected + bias
        out = []
        for j, text in enumerate(texts):
            if text.query:  # every row, expansion included (PyLate keeps them)
                kept = projected[j, :len(text.ids)]
            else:
                keep = np.array([token not in self.skiplist for token in text.ids])
                kept = projected[j, :len(text.ids)][keep]
            kept = kept / np.clip(np.linalg.norm(kept, axis=1, keepdims=True), 1e-12, None)
            out.append(MultiRow(None, None, kept.astype(np.float32, copy=False)))
        return out


def _id(tokenizer: Any, token: str, role: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ConfigError(f"the ColBERT model's {role} marker {token!r} is not in its tokenizer")
    return found


def _special(sources: list[Path], tokenizer: Any, names: tuple[str, ...]) -> int | None:
    """The id of the first of the tokenizer's special tokens `names` that it has, as its
    special_tokens_map.json (or tokenizer_config.json) names them."""
    named: dict[str, Any] = {}
    for source in sources:
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            path = source / file
            if path.is_file():
                named.update(json.loads(path.read_text()))
        if named:
            break
    for name in names:
        value = named.get(name)
        token = value.get("content") if isinstance(value, dict) else value
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return None
