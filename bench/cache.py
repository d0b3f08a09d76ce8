"""The embedding cache on retrieval-like traffic, side by side: this service with its cache (the
default), the same with EMBEDDING_CACHE_MB=0, and Infinity's own server, in one run, A, B, C
alternating. Then what a cache hit costs against a model call, in-process.

    .venv/bin/python bench/cache.py [--seconds 12] [--rounds 2] [--concurrency 16]

The workload: one text per request; half of the requests draw from 1,000 popular texts by a
Zipf law (s = 1.1: the most popular text ~1 in 9 of those), half are texts never sent before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import run_cell  # noqa: E402
from run import Target, bench_models, free_port, prepare_run, targets, tree_cpu_seconds  # noqa: E402
from workload import texts  # noqa: E402

POPULAR, ZIPF_S = 1000, 1.1


def zipf_workload(corpus: list[str], seed: int = 0):
    """`make_body` for run_cell: half popular (Zipf over POPULAR texts), half fresh texts."""
    rng = random.Random(seed)
    popular = corpus[:POPULAR]
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(POPULAR)]
    fresh = iter(range(10**9))

    def make(_: int) -> tuple[dict, int, int]:
        if rng.random() < 0.5:
            text = rng.choices(popular, weights)[0]
        else:  # a text nobody sent: a corpus text with a unique number in front
            text = f"{next(fresh)} {rng.choice(corpus)}"
        return {"model": "minilm", "input": [text]}, 1, 0

    return make


def hit_cost(minilm: Path) -> dict[str, float]:
    """Median seconds of a cache hit and of the model call it saves (one short text), in-process
    on the ONNX Runtime engine."""
    from embedding_worker.config import Settings
    from embedding_worker.core.cache import EmbeddingCache
    from embedding_worker.core.core import Core

    async def measure() -> dict[str, float]:
        core = Core(Settings(model_names=str(minilm), served_model_names="minilm"))
        await core.start()
        model = core.models.get("minilm")
        text = "how do tides work"
        cache = EmbeddingCache(2**20)

        async def compute(batch: list[str]) -> list:
            return (await model.embed(batch))[0]

        await cache.rows("minilm", [text], compute)
        calls, hits = [], []
        for _ in range(200):
            started = time.perf_counter()
            await model.embed([text])
            calls.append(time.perf_counter() - started)
            started = time.perf_counter()
            await cache.rows("minilm", [text], compute)
            hits.append(time.perf_counter() - started)
        await core.stop()
        call, hit = statistics.median(calls), statistics.median(hits)
        return {"model_call_s": call, "cache_hit_s": hit, "hit_over_call": hit / call}

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path,
                        default=HERE / "results" / time.strftime("cache-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    prepare_run(args.out)
    models, _, _ = bench_models()
    minilm = models["minilm"]
    corpus = texts(str(minilm / "vocab.txt"), 4096, seed=7)  # as docs/performance.md's run
    base = {t.name: t for t in targets(models, args.out)}
    worker, infinity = base["worker"], base["infinity"]
    servers = [
        Target("cache-on", worker.command, {**worker.env, "PORT": str(free_port()),
                                            "EMBEDDING_CACHE_MB": "128"}, "/readyz", "/v1",
               args.out / "cache-on.log"),
        Target("cache-off", worker.command, {**worker.env, "PORT": str(free_port()),
                                             "EMBEDDING_CACHE_MB": "0"}, "/readyz", "/v1",
               args.out / "cache-off.log"),
        infinity,
    ]
    rows: dict[str, list[dict]] = {s.name: [] for s in servers}
    try:
        for server in servers:
            server.start()
        for round_ in range(args.rounds):
            for server in servers if round_ % 2 == 0 else servers[::-1]:
                outcome = asyncio.run(run_cell(
                    server.url, server.prefix + "/embeddings", zipf_workload(corpus, round_),
                    args.concurrency, args.seconds,
                    server_cpu=partial(tree_cpu_seconds, server.proc.pid)))
                row = outcome.summary()
                rows[server.name].append(row)
                print(f"{server.name:9s} {row['items_per_s']:8.1f} items/s  p50 "
                      f"{row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  errors "
                      f"{row['errors']}", flush=True)
    finally:
        for server in servers:
            server.stop()
    cost = hit_cost(minilm)
    report = {"concurrency": args.concurrency, "seconds": args.seconds, "runs": rows,
              "hit_cost": cost}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    theirs = statistics.mean(r["items_per_s"] for r in rows["infinity"])
    print("\n| server | items/s | p50 ms | p99 ms | vs Infinity |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in rows.items():
        rate = statistics.mean(r["items_per_s"] for r in runs)
        print(f"| {name} | {rate:.1f} | {statistics.mean(r['p50_ms'] for r in runs):.1f} | "
              f"{statistics.mean(r['p99_ms'] for r in runs):.1f} | {rate / theirs:.2f}x |")
    print(f"\na cache hit: {cost['cache_hit_s'] * 1e6:.1f} us; the model call it saves: "
          f"{cost['model_call_s'] * 1e3:.2f} ms ({cost['hit_over_call']:.2%})")


if __name__ == "__main__":
    main()
