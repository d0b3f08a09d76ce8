"""What compact vectors cost in retrieval: int8, uint8 and binary against float, with the bundled
MiniLM served by the service's own core (in-process, the default backend).

The corpus is the benchmark's deterministic passages (random vocabulary words, ~100-300 tokens);
each query is a span of 5-10 consecutive words of one passage, which is its relevant document. For
each output type: the mean overlap of its top 10 with float's top 10, and recall@10 / recall@1 of
the query's own passage. int8 is ranked by dot product, uint8 by L2 distance (a shift by 128
changes dot products but not distances), binary by Hamming distance. The int8 scale is also swept
(`INT8_SIGMAS`), quantising the float output here with the service's formula.

    .venv/bin/python bench/quantization.py [--passages 1000] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

from workload import texts  # noqa: E402

from embedding_worker.config import BUNDLED_MODEL_ID, Settings, bundled_model_path  # noqa: E402
from embedding_worker.core.core import Core  # noqa: E402
from embedding_worker.core.encoding import INT8_SIGMAS  # noqa: E402


def corpus(n_passages: int, n_queries: int) -> tuple[list[str], list[str], np.ndarray]:
    passages = texts(str(Path(bundled_model_path()) / "vocab.txt"), 2 * n_passages, seed=7)[1::2]
    rng = random.Random(11)
    targets = np.array([rng.randrange(n_passages) for _ in range(n_queries)])
    queries = []
    for target in targets:
        words = passages[target].rstrip(".").split()
        length = rng.randint(5, 10)
        start = rng.randrange(len(words) - length)
        queries.append(" ".join(words[start:start + length]))
    return passages, queries, targets


async def embed(core: Core, inputs: list[str], output_dtype: str) -> np.ndarray:
    rows = []
    for start in range(0, len(inputs), 256):
        result = await core.embeddings.create({"model": BUNDLED_MODEL_ID, "output_dtype": output_dtype,
                                               "input": inputs[start:start + 256]})
        rows += [d["embedding"] for d in result["data"]]
    return np.array(rows)


def ranking(kind: str, q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Passages best first for each query."""
    if kind in ("float", "int8"):
        scores = q.astype(np.float64) @ p.astype(np.float64).T
    elif kind == "uint8":
        q, p = q.astype(np.float64), p.astype(np.float64)
        scores = -((q ** 2).sum(1)[:, None] - 2 * q @ p.T + (p ** 2).sum(1)[None, :])
    else:  # packed bits: Hamming distance
        qb, pb = np.unpackbits(q.astype(np.uint8), axis=1), np.unpackbits(p.astype(np.uint8), axis=1)
        scores = -(qb[:, None, :] != pb[None, :, :]).sum(2)
    return np.argsort(-scores, axis=1, kind="stable")


def report(kind: str, order: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> str:
    overlap = np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(order, reference)])
    recall10 = np.mean([t in row[:10] for t, row in zip(targets, order)])
    recall1 = np.mean(order[:, 0] == targets)
    return f"| {kind} | {overlap:.3f} | {recall10:.3f} | {recall1:.3f} |"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    passages, queries, targets = corpus(args.passages, args.queries)
    core = Core(Settings())
    await core.start()
    try:
        started = time.perf_counter()
        vectors = {kind: (await embed(core, queries, kind), await embed(core, passages, kind))
                   for kind in ("float", "int8", "uint8", "binary")}
        seconds = time.perf_counter() - started
        backend = core.models.card(BUNDLED_MODEL_ID)["backend"]
    finally:
        await core.stop()
    print(f"{len(passages)} passages, {len(queries)} queries, {BUNDLED_MODEL_ID}, "
          f"{backend}; embedded 4x in {seconds:.0f} s\n")
    reference = ranking("float", *vectors["float"])
    print("| output | top-10 overlap with float | recall@10 | recall@1 |\n| --- | --- | --- | --- |")
    for kind, (q, p) in vectors.items():
        print(report(kind, ranking(kind, q, p), reference, targets))
    print(f"\nint8 scale swept (the service uses INT8_SIGMAS = {INT8_SIGMAS:g}):\n")
    print("| INT8_SIGMAS | top-10 overlap | recall@10 | recall@1 | components clipped |\n"
          "| --- | --- | --- | --- | --- |")
    qf, pf = vectors["float"]
    for sigmas in (2, 3, 4, 5, 6, 8):
        scale = 127 * np.sqrt(qf.shape[1]) / sigmas
        quantised = [np.clip(np.rint(m * scale), -128, 127) for m in (qf, pf)]
        clipped = np.mean(np.abs(pf * scale) > 127.5)
        line = report(f"{sigmas:g}", ranking("int8", *quantised), reference, targets)
        print(f"{line} {clipped:.5f} |")


if __name__ == "__main__":
    asyncio.run(main())
