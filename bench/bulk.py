"""Bulk embedding (issue 36, point 5): `embedding-worker bulk` on a local Ray cluster against
sentence-transformers' multi-process encode, this service over HTTP at its best concurrency, and
the engine in one process without Ray (`api.bulk.Embedder` called directly); one corpus of mixed
lengths (half queries, half ~100-300-token passages), the bundled MiniLM, one machine, the four
alternated (A, B, C, D, A, B, C, D).

    .venv/bin/python bench/bulk.py [--texts 20000] [--rounds 2]

Each is timed from its model loaded to its last vector (`bulk`: the whole command, and apart
from it Ray's start and a model load, to subtract); peak RSS is the process tree's. Every one runs
at the service's default precision except sentence-transformers (torch fp32, its default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from runtimes import cpu  # noqa: E402
from server import free_port  # noqa: E402
from workload import texts as corpus_texts  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ST_CHILD = """
import json, sys, time
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[1]))
model = SentenceTransformer(sys.argv[2], device="cpu")
pool = model.start_multi_process_pool(["cpu"] * int(sys.argv[3]))
model.encode_multi_process(texts[:256], pool, batch_size=32)
start = time.perf_counter()
model.encode_multi_process(texts, pool, batch_size=32)
print(json.dumps({"seconds": time.perf_counter() - start}))
model.stop_multi_process_pool(pool)
"""
ENGINE_CHILD = """
import json, sys, time
import numpy as np
from embedding_worker.api.bulk import Embedder
texts = json.load(open(sys.argv[1]))
start = time.perf_counter()
stage = Embedder()
loaded = time.perf_counter()
for at in range(0, len(texts), 256):
    stage({"text": np.array(texts[at:at + 256], dtype=object)})
print(json.dumps({"seconds": time.perf_counter() - loaded, "load_s": loaded - start}))
"""
RAY_START = """
import json, os, time
t = time.perf_counter()
import ray
ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


class Peak:
    """The peak RSS of a process tree, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.mb, self._stop = pid, 0.0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.mb = max(self.mb, rss / 2**20)
            except psutil.Error:
                pass

    def stop(self) -> float:
        self._stop.set()
        return self.mb


def child(code: str, *args: str, env: dict | None = None) -> tuple[dict, float]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    peak = Peak(proc.pid)
    out, _ = proc.communicate()
    mb = peak.stop()
    if proc.returncode:
        sys.exit(f"child failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), mb


def bulk_cell(corpus: Path, out: Path) -> tuple[float, float]:
    command = [sys.executable, "-m", "embedding_worker", "bulk", str(corpus), str(out),
               "--id-column", "id"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": ""})
    peak = Peak(proc.pid)
    if proc.wait():
        sys.exit("bulk failed")
    return time.perf_counter() - start, peak.stop()


async def http_cell(url: str, texts: list[str], concurrency: int, per_request: int = 32) -> float:
    chunks = [texts[at:at + per_request] for at in range(0, len(texts), per_request)]
    queue: asyncio.Queue = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while not queue.empty():
                chunk = queue.get_nowait()
                response = await client.post(url, json={"model": MINILM, "input": chunk})
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def http_round(texts: list[str], log: Path) -> tuple[float, int, float]:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "EMBEDDING_CACHE_MB": "0",
           "MAX_INPUT_ITEMS": "4096", "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "embedding_worker", "serve"], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    peak = Peak(proc.pid)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        asyncio.run(http_cell(url, texts[:512], 8))  # warm
        best = min((asyncio.run(http_cell(url, texts, c)), c) for c in (4, 16))
        return best[0], best[1], peak.stop()
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedding_worker.config import bundled_model_path

    out = HERE / "results" / f"bulk-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    texts = corpus_texts(str(Path(bundled_model_path()) / "vocab.txt"), args.texts)
    corpus_json, corpus = out / "corpus.json", out / "corpus.parquet"
    corpus_json.write_text(json.dumps(texts))
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), corpus)
    cores = os.cpu_count() or 1
    rows = []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as scratch:
            seconds, mb = bulk_cell(corpus, Path(scratch) / "out")
        ray_start, _ = child(RAY_START)
        rows.append({"who": "bulk (Ray, whole command)", "seconds": seconds, "peak_mb": mb,
                     "ray_start_s": ray_start["seconds"]})
        st, mb = child(ST_CHILD, str(corpus_json), bundled_model_path(), str(cores))
        rows.append({"who": f"sentence-transformers encode_multi_process x{cores}",
                     "seconds": st["seconds"], "peak_mb": mb})
        seconds, concurrency, mb = http_round(texts, out / f"server-{round_}.log")
        rows.append({"who": f"this service over HTTP (best: c={concurrency}, 32 a request)",
                     "seconds": seconds, "peak_mb": mb})
        engine, mb = child(ENGINE_CHILD, str(corpus_json))
        rows.append({"who": "the engine in one process (Embedder, no Ray)",
                     "seconds": engine["seconds"], "peak_mb": mb, "load_s": engine["load_s"]})
        # bulk's embedding alone, estimated: the command less Ray's start and a model's load
        bulk = rows[-4]
        bulk["net_seconds"] = bulk["seconds"] - bulk["ray_start_s"] - engine["load_s"]
        bulk["net_items_per_s"] = len(texts) / bulk["net_seconds"]
        for row in rows[-4:]:
            row["items_per_s"] = len(texts) / row["seconds"]
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps({"cpu": cpu(), "texts": len(texts),
                                                  "rows": rows}, indent=1))
    print("CPU:", cpu())


if __name__ == "__main__":
    main()
