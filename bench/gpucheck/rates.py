"""The machine's matrix rate and a BERT's FLOPs per token: what 'fraction of the GPU' divides.

    python -m gpucheck.rates OUT.json [--dry-run]
"""

from __future__ import annotations

import json
import sys
import time


def flops_per_token(*, layers: int, hidden: int, intermediate: int, tokens: int) -> float:
    """Forward FLOPs per token of a BERT encoder on `tokens`-token inputs: per layer the four
    attention projections (8 h^2) and the feed-forward (4 h i), i.e. twice the parameters outside
    the embeddings, plus the attention scores and their weighted sum (4 L h). Embeddings, layer
    norms, softmax and pooling are left out (under 1 % at these sizes)."""
    return layers * (8 * hidden**2 + 4 * hidden * intermediate + 4 * tokens * hidden)


def matmul_rate(dry_run: bool) -> dict:
    """bf16 n x n x n products on the GPU timed with CUDA events (the mean of ten after three
    warm-ups); with --dry-run, or without CUDA, fp32 on the CPU at a small size (a rate for the
    arithmetic to run on, not a peak)."""
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (256, torch.float32, "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    runs = 10
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(runs):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000 / runs
    else:
        began = time.perf_counter()
        for _ in range(runs):
            a @ b
        seconds = (time.perf_counter() - began) / runs
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
            "n": n, "seconds_per_product": seconds, "flops_per_s": 2 * n**3 / seconds}


if __name__ == "__main__":
    result = matmul_rate("--dry-run" in sys.argv)
    print(f"{result['dtype']} {result['n']}^3 on {result['device']}: {result['flops_per_s'] / 1e12:.2f} TFLOP/s")
    with open(sys.argv[1], "w") as out:
        json.dump(result, out)
