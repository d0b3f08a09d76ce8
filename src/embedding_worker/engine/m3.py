"""BGE-M3's two heads on the CPU engine: from the encoder's token states of one text, its lexical
weights (a sparse vector) and its ColBERT vectors, beside the dense vector the engine pools.

As FlagEmbedding computes them (`BGEM3FlagModel`): a token's weight is ReLU(sparse_linear(h)),
kept per token id at its largest, the tokenizer's CLS, EOS, PAD and UNK ids dropped; the
ColBERT vectors are colbert_linear(h) of every token but the first ([CLS]), each of unit length.
The heads come from the model's `colbert_linear.pt` and `sparse_linear.pt`, converted to numpy
by the export (`onnx_export`), so serving needs no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .base import MultiRow, SparseRow

HEADS = ("colbert_linear.pt", "sparse_linear.pt")  # beside a BGE-M3 model
HEADS_FILE = "m3_heads.npz"  # their export
UNUSED = ("cls_token", "eos_token", "pad_token", "unk_token")


class M3Heads:
    def __init__(self, directory: Path, tokenizer: Any, sources: list[Path]):
        heads = np.load(directory / HEADS_FILE)
        self.colbert_weight = np.ascontiguousarray(heads["colbert_linear.weight"].T)
        self.colbert_bias = heads["colbert_linear.bias"]
        self.sparse_weight = heads["sparse_linear.weight"][0]
        self.sparse_bias = float(heads["sparse_linear.bias"][0])
        self.unused = _special_ids(tokenizer, sources)

    def row(self, dense: np.ndarray, states: np.ndarray, ids: list[int]) -> MultiRow:
        """`states`: one text's token states, unpadded; `ids`: its token ids."""
        weights = np.maximum(states @ self.sparse_weight + self.sparse_bias, 0).tolist()
        best: dict[int, float] = {}
        for token, weight in zip(ids, weights):
            if weight > 0 and token not in self.unused and weight > best.get(token, 0.0):
                best[token] = weight
        indices = np.array(sorted(best), dtype=np.int64)
        values = np.array([best[i] for i in indices.tolist()], dtype=np.float32)
        multi = states[1:] @ self.colbert_weight + self.colbert_bias
        multi /= np.clip(np.linalg.norm(multi, axis=1, keepdims=True), 1e-12, None)
        return MultiRow(dense, SparseRow(indices, values), multi.astype(np.float32, copy=False))


def _special_ids(tokenizer: Any, sources: list[Path]) -> set[int]:
    """The ids of the tokenizer's CLS, EOS, PAD and UNK tokens, as its special_tokens_map.json
    (or tokenizer_config.json) names them."""
    names: dict[str, Any] = {}
    for source in sources:
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            path = source / file
            if path.is_file():
                names.update({k: v for k, v in json.loads(path.read_text()).items() if k in UNUSED})
        if names:
            break
    ids = set()
    for value in names.values():
        token = value.get("content") if isinstance(value, dict) else value
        found = tokenizer.token_to_id(token) if isinstance(token, str) else None
        if found is not None:
            ids.add(found)
    return ids
