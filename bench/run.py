"""Side-by-side benchmark: this service vs Infinity's own server vs the raw model ceiling.

    .venv/bin/python bench/run.py [--quick] [--out bench/results/NAME]

Same models, same machine, same run. Infinity's server (`infinity_emb v2`, the thing the seed
wraps) runs from its own environment, bench/.venv-infinity (see bench/README.md), because its
server extra pins old uvicorn/typer. Writes results.json, report.md and plot.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

from load import run_cell  # noqa: E402
from server import free_port  # noqa: E402  (one port picker: it avoids the ephemeral range)
from workload import texts  # noqa: E402

INFINITY_PY = HERE / ".venv-infinity" / "bin" / "python"
# Below this many texts in flight (concurrency x texts per request) a cell's batches are smaller
# than the ceiling's, and the ceiling is also measured fed that many at a time: `_ceiling_by_texts`.
SMALL_IN_FLIGHT = 128


def make_reranker(path: Path, embedder: str) -> Path:
    """A cross-encoder with MiniLM-L6's shape (as cross-encoder/ms-marco-MiniLM-L-6-v2):
    random weights, real compute, real tokenizer."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(embedder, num_labels=1,
                                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedder).save_pretrained(path)
    return path


def prepare_run(out: Path) -> None:
    """The results directory, and Infinity's environment the side-by-side runs need."""
    out.mkdir(parents=True, exist_ok=True)
    if not INFINITY_PY.exists():
        sys.exit(f"{INFINITY_PY} missing: see bench/README.md to create Infinity's environment")


def bench_models() -> tuple[dict[str, Path], list[str], list[int]]:
    """The benchmark's models (the bundled MiniLM and a cross-encoder of its shape), its corpus
    of 2048 texts and their token counts."""
    from transformers import AutoTokenizer

    from embedding_worker.config import bundled_model_path

    minilm = Path(bundled_model_path())
    models = {"minilm": minilm,
              "reranker": make_reranker(HERE / "results" / "minilm-reranker", str(minilm))}
    corpus = texts(str(minilm / "vocab.txt"), 2048)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    tokens = [len(ids) for ids in tokenizer(corpus, truncation=True, max_length=256)["input_ids"]]
    return models, corpus, tokens


def process_tree(pid: int) -> list[psutil.Process]:
    """A server process and its descendants (BentoML: arbiter and worker)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a server's process tree."""
    try:
        return sum(sum(proc.cpu_times()[:2]) for proc in process_tree(pid))
    except psutil.Error:
        return 0.0


class Target:
    """A server process: start it, time its cold start, sample its memory, stop it."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], ready_path: str | None,
                 prefix: str, log: Path, *, job: bool = False, cells: bool = True):
        self.name, self.command, self.env, self.ready_path = name, command, env, ready_path
        self.prefix, self.log = prefix, log
        self.job = job  # takes RunPod jobs (POST /runsync) instead of OpenAI requests
        self.cells = cells  # load cells too, not only cold starts
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.peak_rss = 0
        self._sampling = False

    def start(self) -> dict:
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=ROOT, start_new_session=True,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()
        ready = first = None
        body = {"model": "minilm", "input": ["cold start"]}
        path, payload = ("/runsync", {"input": body}) if self.job else (self.prefix + "/embeddings", body)
        while first is None:
            if self.proc.poll() is not None or time.perf_counter() - started > 300:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-3000:]}")
            try:
                if (ready is None and self.ready_path
                        and httpx.get(self.url + self.ready_path, timeout=1).status_code == 200):
                    ready = time.perf_counter() - started
                answer = httpx.post(self.url + path, json=payload, timeout=5)
                if answer.status_code == 200 and (not self.job or answer.json().get("status") == "COMPLETED"):
                    first = time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return {"cold_start_ready_s": ready or first, "cold_start_first_embedding_s": first}

    def _sample(self) -> None:
        while self._sampling:
            try:
                rss = sum(p.memory_info().rss for p in process_tree(self.proc.pid))
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            time.sleep(0.25)

    def stop(self) -> None:
        self._sampling = False
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def one_cell(self, path: str, body, concurrency: int, seconds: float) -> dict:
        """Start, load one cell of `body(i)` requests, stop: the cell's summary, peak RSS."""
        self.start()
        try:
            pid = self.proc.pid
            got = asyncio.run(run_cell(self.url, path, body, concurrency, seconds,
                                       server_cpu=lambda: tree_cpu_seconds(pid)))
            return {**got.summary(), "peak_rss_mb": self.peak_rss / 2**20}
        finally:
            self.stop()


def run_child(code: str, args: dict, out: Path, env: dict[str, str] | None = None) -> dict:
    """`code` in a fresh Python with `args` (as JSON in a file, its path as argv[1]); the JSON of
    its last line of output."""
    (out / "child-args.json").write_text(json.dumps(args))
    done = subprocess.run([sys.executable, "-c", code, str(out / "child-args.json")], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def targets(models: dict[str, Path], out: Path) -> list[Target]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_NAMES", "SERVED_"))}
    base.update(HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="true", DO_NOT_TRACK="1",
                INFINITY_ANONYMOUS_USAGE_STATS="0")
    names = f"{models['minilm']};{models['reranker']}"
    ours = {**base, "PORT": str(free_port()), "MODEL_NAMES": names,
            "SERVED_MODEL_NAMES": "minilm;reranker", "HOST": "127.0.0.1",
            # Infinity's server has no deadline; at c=64 x 64 texts queues here reach ~70 s
            "REQUEST_TIMEOUT": "600",
            # the cells draw from 2048 texts: with the embedding cache they would measure memory,
            # not compute (bench/cache.py measures the cache)
            "EMBEDDING_CACHE_MB": "0"}
    port = free_port()
    theirs = {**base, "PORT": str(port)}
    rp_port = free_port()
    runpod = {**ours, "PORT": str(rp_port)}
    return [
        Target("worker", [sys.executable, "-m", "embedding_worker", "serve"], ours, "/readyz", "/v1",
               out / "worker.log"),
        # the serverless path: one process, the SDK's local job API (cold starts only)
        Target("worker-runpod", [sys.executable, "-m", "embedding_worker", "runpod", "--rp_serve_api",
                                 "--rp_api_host", "127.0.0.1", "--rp_api_port", str(rp_port)],
               runpod, None, "", out / "worker-runpod.log", job=True, cells=False),
        Target("infinity", [str(INFINITY_PY.parent / "infinity_emb"), "v2",
                            "--model-id", str(models["minilm"]), "--served-model-name", "minilm",
                            "--model-id", str(models["reranker"]), "--served-model-name", "reranker",
                            "--engine", "torch", "--batch-size", "32", "--no-model-warmup",
                            "--host", "127.0.0.1", "--port", str(port)],
               theirs, "/health", "", out / "infinity.log"),
    ]


def grid() -> list[dict]:
    # the c=1 target is a single short request: the mix's one-text cell jumps between its query
    # and passage clusters at p50, so a cell of short queries alone measures it
    cells = [{"kind": "query", "concurrency": 1, "size": 1, "format": "float"}]
    for concurrency in (1, 4, 16, 64):
        for size in (1, 8, 64):
            cells.append({"kind": "embed", "concurrency": concurrency, "size": size, "format": "float"})
        cells.append({"kind": "embed", "concurrency": concurrency, "size": 8, "format": "base64"})
        cells.append({"kind": "rerank", "concurrency": concurrency, "size": 32, "format": "float"})
    return cells


def body_maker(cell: dict, corpus: list[str], tokens: list[int]):
    n = len(corpus)

    def embed(i: int):
        start = (i * cell["size"]) % (n - cell["size"])
        chunk = corpus[start:start + cell["size"]]
        body = {"model": "minilm", "input": chunk, "encoding_format": cell["format"]}
        return body, len(chunk), sum(tokens[start:start + cell["size"]])

    def query(i: int):  # the workload's even texts are its short queries
        at = 2 * (i % (n // 2))
        return {"model": "minilm", "input": corpus[at], "encoding_format": cell["format"]}, 1, tokens[at]

    def rerank(i: int):
        start = (i * 33) % (n - 33)
        query, docs = corpus[start], corpus[start + 1:start + 33]
        body = {"model": "reranker", "query": query, "documents": docs}
        return body, len(docs), sum(tokens[start + 1:start + 33]) + len(docs) * tokens[start]

    return {"embed": embed, "query": query, "rerank": rerank}[cell["kind"]]


def _best_rate(run, items: list, batches=(16, 32, 64)) -> tuple[float, float]:
    """Items per second of `run(items, batch_size)` at its best batch size (after a warm-up), and
    the CPU milliseconds per item of that run (all of this process's threads)."""
    best = (0.0, 0.0)
    for batch in batches:
        run(items[:batch], batch)
        start, cpu = time.perf_counter(), time.process_time()
        run(items, batch)
        rate = len(items) / (time.perf_counter() - start)
        if rate > best[0]:
            best = (rate, (time.process_time() - cpu) * 1000 / len(items))
    return best


def ceiling(models: dict[str, Path], corpus: list[str], quick: bool) -> dict:
    """The raw model in this process at its best batch size: what no server can beat."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 1)
    sample = corpus[: 256 if quick else 512]
    st = SentenceTransformer(str(models["minilm"]), device="cpu")
    ce = CrossEncoder(str(models["reranker"]), device="cpu")
    pairs = [(sample[0], d) for d in sample[1:129]]
    embed, embed_cpu = _best_rate(lambda items, batch: st.encode(items, batch_size=batch), sample)
    rerank, rerank_cpu = _best_rate(lambda items, batch: ce.predict(items, batch_size=batch), pairs)
    return {"embed_items_per_s": embed, "rerank_pairs_per_s": rerank,
            "embed_cpu_ms_per_item": embed_cpu, "rerank_cpu_ms_per_pair": rerank_cpu,
            "embed_items_per_s_by_texts": _ceiling_by_texts(st, sample[:SMALL_IN_FLIGHT])}


def _ceiling_by_texts(st, sample: list[str]) -> dict[str, float]:
    """The raw model fed n texts at a time (each group sorted by length and cut into batches of
    the best size for it). A closed loop of c requests of s texts never holds more than c x s
    texts, so a server's batches in that cell are no better than these; it can only overlap its
    own overheads (tokenisation, HTTP) with the model, which `encode` does not."""
    def grouped(n: int):
        return lambda items, batch: [st.encode(items[i:i + n], batch_size=batch) for i in range(0, len(items), n)]

    in_flight = sorted({n for c in grid() if c["kind"] == "embed"
                        if (n := c["concurrency"] * c["size"]) < SMALL_IN_FLIGHT})
    # str keys: they survive results.json; batches of 1 never win past 4 texts
    return {str(n): _best_rate(grouped(n), sample, [b for b in (1, 2, 4, 8, 16) if b <= n and (b > 1 or n < 8)])[0]
            for n in in_flight}


def _mean(a: dict, b: dict) -> dict:
    return {key: _mean(a[key], b[key]) if isinstance(a[key], dict) else (a[key] + b[key]) / 2 for key in a}


def measure(targets: list[Target], cells: list[dict], corpus, tokens, duration: float,
            cold_rounds: int) -> list[dict]:
    """Cold starts first, each server alone on the machine, alternating; then every cell on each
    server in turn with both up (alternating which goes first), so that the machine's drift over
    the run hits both alike: the machine this runs on is shared and its speed wanders."""
    results = {t.name: {"name": t.name, "cells": []} for t in targets}
    starts: dict[str, list[dict]] = {t.name: [] for t in targets}
    for _ in range(cold_rounds):
        for target in targets:
            try:
                starts[target.name].append(target.start())
            finally:
                target.stop()
    for target in targets:
        for key in starts[target.name][0]:
            values = sorted(s[key] for s in starts[target.name])
            results[target.name][key] = values[len(values) // 2]  # median
            results[target.name][key + "_all"] = values
    loaded = [t for t in targets if t.cells]
    try:
        for target in loaded:
            target.start()
        for i, cell in enumerate(cells):
            for target in loaded if i % 2 == 0 else loaded[::-1]:
                path = target.prefix + ("/rerank" if cell["kind"] == "rerank" else "/embeddings")
                outcome = asyncio.run(run_cell(target.url, path, body_maker(cell, corpus, tokens),
                                               cell["concurrency"], duration,
                                               server_cpu=partial(tree_cpu_seconds, target.proc.pid)))
                row = {**cell, **outcome.summary()}
                results[target.name]["cells"].append(row)
                print(f"{target.name:9s} {cell['kind']:6s} c={cell['concurrency']:<3d} "
                      f"n={cell['size']:<3d} {cell['format']:6s} {row['items_per_s']:8.1f} items/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  errors {row['errors']}", flush=True)
    finally:
        for target in targets:
            target.stop()
    for target in targets:
        results[target.name]["peak_rss_mb"] = target.peak_rss / 2**20
    return list(results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter cells (a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--only", choices=["worker", "worker-runpod", "infinity"], help="one server only")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold starts per server (median)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not INFINITY_PY.exists() and args.only != "worker":
        sys.exit(f"{INFINITY_PY} missing: see bench/README.md to create Infinity's environment")

    models, corpus, tokens = bench_models()
    duration = 4.0 if args.quick else 12.0
    cells = grid()

    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(), "gpu": None},
        "duration_s": duration,
        "targets": [],
    }
    # The ceiling before and after the servers (nothing else running), ratios against the mean:
    # one measurement moved by 20 % between runs as the shared machine's speed drifts.
    first = ceiling(models, corpus, args.quick)
    print("ceiling", first, flush=True)
    chosen = [t for t in targets(models, args.out) if not args.only or t.name == args.only]
    report["targets"] = measure(chosen, cells, corpus, tokens, duration, args.cold_starts)
    last = ceiling(models, corpus, args.quick)
    print("ceiling", last, flush=True)
    report["ceiling_runs"] = [first, last]
    report["ceiling"] = _mean(first, last)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    from report import write_report

    write_report(report, args.out)
    print(f"wrote {args.out}/report.md and plot.png")


if __name__ == "__main__":
    main()
