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

from typing import Any

# The padded tokens per group: budgets of 512-2048 measured alike (docs/performance.md).
GROUP_TOKENS = 1024


def token_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices in groups of similar length, each holding at most `budget` padded tokens
    (a row longer than the budget alone), shortest first."""
    groups: list[list[int]] = []
    group: list[int] = []
    for row in sorted(range(len(lengths)), key=lengths.__getitem__):
        if group and lengths[row] * (len(group) + 1) > budget:  # sorted: this row is the longest
            groups.append(group)
            group = []
        group.append(row)
    return groups + [group] if group else groups


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
