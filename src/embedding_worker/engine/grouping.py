"""Length-sorted groups: on a CPU, run each batch as groups of similar length rather than padded
whole to its longest text.

infinity pads a batch (BATCH_SIZES, 32 by default) to its longest member. With queries and
passages mixed, ~18 % of the work is padding, and the large attention tensors of a long, wide
batch cost more per token than small ones. A CPU gains nothing from wide batches, so the
encoder is called on groups of at most GROUP_TOKENS padded tokens, each cut to its own longest
row, and the rows are put back in batch order. Outputs equal the whole batch's (padding is
masked). Measured in-process on the bench mix: +25 % (ONNX Runtime) and +30 % (torch) items/s,
budgets of 512-2048 alike; docs/performance.md has the runs through the server. On a GPU, wide
batches are what keeps it busy, so models there are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The padded tokens per group: budgets of 512-2048 measured alike (docs/performance.md).
GROUP_TOKENS = 1024


def token_groups(lengths: list[int], budget: int,
                 shape: Callable[[int, int], tuple[int, int]] | None = None) -> list[list[int]]:
    """Row indices in groups of similar length, each holding at most `budget` padded tokens
    (a row longer than the budget alone), shortest first.

    `shape` is what the runtime pads a group of (rows, width) to (`Session.shape`; OpenVINO
    rounds both to a few sizes): the budget holds for the padded shape, and a group cut short by
    it keeps only as many rows as one of those sizes holds, the rest starting the next group,
    rather than paying for padding rows (9 rows of a bucket of 12: a quarter of the work)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    at = 0
    while at < len(order):
        end = at + 1
        while end < len(order):  # sorted: the row at `end` is the widest so far
            rows, width = end + 1 - at, lengths[order[end]]
            padded_rows, padded_width = shape(rows, width) if shape else (rows, width)
            if padded_rows * padded_width > budget:
                break
            end += 1
        if shape and end < len(order):  # cut short: fill whole padded rows
            width = lengths[order[end - 1]]
            while end - at > 1 and shape(end - at, width)[0] != end - at:
                end -= 1
        groups.append(order[at:end])
        at = end
    return groups


def grouped(core: Any, budget: int = GROUP_TOKENS) -> Any:
    """`core` (an encoder stage taking padded features) run in token groups; `compat` decides
    which models it fits (infinity's text classes, padded on the right)."""

    def encode_core(features: dict[str, Any]) -> Any:
        lengths = features["attention_mask"].sum(1)
        groups = token_groups(lengths.tolist(), budget)
        if len(groups) == 1:
            return core(features)
        done = []
        for rows in groups:
            width = int(lengths[rows].max())
            done.append((rows, core({k: v[rows, :width] for k, v in features.items()})))
        return _merge(features["attention_mask"], done)

    return encode_core


def _merge(mask: Any, done: list) -> Any:
    """The groups' outputs in batch order: pooled embeddings or logits row by row; token
    embeddings (infinity's ONNX embedder pools after this stage) zero-padded to the batch's
    width, which pooling reads through the batch's attention mask."""
    import numpy as np

    first = done[0][1]
    if isinstance(first, dict):
        tokens = first["token_embeddings"]
        out = np.zeros((*mask.shape, tokens.shape[-1]), dtype=tokens.dtype)
        for rows, result in done:
            width = result["token_embeddings"].shape[1]
            out[rows, :width] = result["token_embeddings"]
        return {"token_embeddings": out, "attention_mask": mask}
    shape = (mask.shape[0], *first.shape[1:])
    out = np.empty(shape, first.dtype) if isinstance(first, np.ndarray) else first.new_empty(shape)
    for rows, result in done:
        out[rows] = result
    return out
