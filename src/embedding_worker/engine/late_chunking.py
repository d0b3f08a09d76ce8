"""Late chunking (Jina's): a document's chunks embedded in one pass over the whole document, each
chunk's vector the mean of its own tokens' states, so each chunk's vector has seen the rest.

The chunks are joined with a space (as Jina's API joins them) after the prompt. A token belongs
to the chunk its text starts in; the prompt's tokens and the leading special token ([CLS]) to the
first chunk, the trailing one ([SEP]) to the last, as Jina's reference code spans them. A document
past the model's window is read in consecutive windows, each wrapped in the special tokens; a chunk
then sees the context of the window(s) its tokens are in (docs/retrieval.md).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any

import numpy as np

from .base import LateChunks

# the encoder's token states of rows padded together: (ids rows, token type rows) -> an array
# rows x tokens x hidden
Forward = Callable[[list[list[int]], list[list[int]]], Any]


def owners(text: str, prefix: str, chunks: list[str], offsets: list[tuple[int, int]],
           special: list[int]) -> list[int]:
    """The chunk each token of `text` (= prefix + " ".join(chunks)) belongs to."""
    starts, at = [], len(prefix)
    for chunk in chunks:
        starts.append(at)
        at += len(chunk) + 1
    inner = [i for i, is_special in enumerate(special) if not is_special]
    first = inner[0] if inner else len(special)
    owner = []
    for i, (start, end) in enumerate(offsets):
        if special[i]:
            owner.append(0 if i < first else len(chunks) - 1)
            continue
        # a token's span may begin at the space before its word (SentencePiece's "▁")
        while start < end - 1 and text[start].isspace():
            start += 1
        owner.append(max(0, bisect_right(starts, start) - 1))
    return owner


def windows(special: list[int], window: int) -> tuple[list[list[int]], list[list[bool]]]:
    """The token positions of each window the document is read in, and which of them are pooled
    there: the whole document where it fits; else its inner tokens in consecutive runs, each
    wrapped in the document's leading and trailing special tokens, which are pooled only in the
    first and the last window respectively."""
    n = len(special)
    if n <= window:
        return [list(range(n))], [[True] * n]
    inner = [i for i, is_special in enumerate(special) if not is_special]
    lead = [i for i in range(n) if special[i] and (not inner or i < inner[0])]
    trail = [i for i in range(n) if special[i] and inner and i > inner[-1]]
    room = window - len(lead) - len(trail)
    if room < 1:
        raise ValueError(f"a window of {window} tokens holds no text between its special tokens")
    runs = [inner[at:at + room] for at in range(0, len(inner), room)]
    pieces, pooled = [], []
    for k, run in enumerate(runs):
        pieces.append(lead + run + trail)
        pooled.append([k == 0] * len(lead) + [True] * len(run) + [k == len(runs) - 1] * len(trail))
    return pieces, pooled


def embed(text: str, prefix: str, chunks: list[str], encoding: Any, window: int, per_run: int,
          forward: Forward, normalise: bool, special_tokens: int) -> LateChunks:
    """The chunks' vectors from `encoding` (the untruncated encoding of `text` = prefix + the
    chunks joined: `ids`, `type_ids`, `offsets`, `special_tokens_mask`), the document read in
    windows, `per_run` windows per `forward` call; unit length if `normalise` (the model's own
    Normalize module). Its tokens: the encoding's less the `special_tokens` a text gets."""
    owner = np.asarray(owners(text, prefix, chunks, encoding.offsets,
                              encoding.special_tokens_mask))
    pieces, pooled_there = windows(encoding.special_tokens_mask, window)
    sums: np.ndarray | None = None
    counts = np.zeros(len(chunks), dtype=np.int64)
    for at in range(0, len(pieces), per_run):
        run = pieces[at:at + per_run]
        result = forward([[encoding.ids[i] for i in piece] for piece in run],
                         [[encoding.type_ids[i] for i in piece] for piece in run])
        if sums is None:
            sums = np.zeros((len(chunks), result.shape[-1]), dtype=np.float64)
        for states, piece, pooled in zip(result, run, pooled_there[at:at + per_run]):
            rows = np.flatnonzero(pooled)
            chunk_of = owner[np.asarray(piece)[rows]]
            np.add.at(sums, chunk_of, states[rows])
            np.add.at(counts, chunk_of, 1)
    assert sums is not None
    vectors = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    if normalise:
        vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return LateChunks(vectors, counts.tolist(), len(encoding.ids) - special_tokens)
