"""Throughput through the server: a small and a base-size BERT (random weights) at 128- and
512-token inputs, each at one request of one text (latency) and at a closed loop of many
requests (throughput), with `bench/load.py`'s load generator; then one profiled cell
(gpucheck/sampler.py in the server's worker).

    python -m gpucheck.throughput OUT.json SCRATCH [--dry-run]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from gpu_models import make_bert  # noqa: E402
from load import run_cell  # noqa: E402
from run import tree_cpu_seconds  # noqa: E402
from server import BentoServer  # noqa: E402
from workload import fixed_tokens  # noqa: E402

from gpucheck.rates import flops_per_token  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    intermediate: int


# MiniLM-L6's shape and bert-base's; --dry-run: two tiny ones, so the same steps run in CI time
MODELS = {"small": Shape(6, 384, 12, 1536), "base": Shape(12, 768, 12, 3072)}
DRY_MODELS = {"small": Shape(2, 32, 2, 64), "base": Shape(2, 64, 2, 128)}
LENGTHS = (128, 512)
# (name, concurrency, texts per request); throughput: 256 texts in flight, 8 batches of 32
CELLS = (("latency", 1, 1), ("throughput", 32, 8))
DRY_CELLS = (("latency", 1, 1), ("throughput", 4, 4))


class GpuBusy:
    """The GPU's utilisation (NVML: the share of time a kernel ran), sampled every 100 ms while
    a cell runs, warm-up included; None without NVML (a CPU)."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no driver, no NVML: no reading
            self._nvml = None
        self._samples: list[int] = []
        self._running = False

    def __enter__(self) -> "GpuBusy":
        if self._nvml is not None:
            self._samples, self._running = [], True
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self._running = False

    @property
    def fraction(self) -> float | None:
        return sum(self._samples) / len(self._samples) / 100 if self._samples else None


def bodies(model: str, texts: list[str], size: int, tokens: int):
    def make(i: int):
        start = (i * size) % (len(texts) - size)
        return {"model": model, "input": texts[start:start + size]}, size, size * tokens
    return make


def measure(server: BentoServer, shapes: dict[str, Shape], cells, seconds: float, warmup: float,
            texts: dict[int, list[str]], save) -> list[dict]:
    """Every cell in turn; `save(rows)` after each, so a step stopped at its limit keeps the
    cells it finished."""
    rows = []
    busy = GpuBusy()
    for model, shape in shapes.items():
        for length in LENGTHS:
            for cell, concurrency, size in cells:
                with busy:
                    outcome = asyncio.run(run_cell(
                        server.url, "/v1/embeddings", bodies(model, texts[length], size, length),
                        concurrency, seconds, warmup=warmup,
                        server_cpu=lambda: tree_cpu_seconds(server.proc.pid)))
                row = {"model": model, "tokens": length, "cell": cell, "concurrency": concurrency,
                       "texts_per_request": size, **outcome.summary(), "gpu_busy": busy.fraction,
                       "flops_per_token": flops_per_token(layers=shape.layers, hidden=shape.hidden,
                                                          intermediate=shape.intermediate, tokens=length)}
                row["flops_per_s"] = row["tokens_per_s"] * row["flops_per_token"]
                rows.append(row)
                save(rows)
                print(f"{model:5s} {length:3d} tokens {cell:10s} c={concurrency:<2d} x{size}: "
                      f"{row['tokens_per_s']:10.0f} tokens/s  p50 {row['p50_ms']:7.1f} ms  "
                      f"p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}", flush=True)
    return rows


def profile(server: BentoServer, folder: Path, model: str, length: int, cell, seconds: float,
            texts: dict[int, list[str]]) -> dict:
    """One more cell with the sampler on (its own numbers: sampling costs some throughput)."""
    name, concurrency, size = cell
    for stale in folder.glob("*"):
        stale.unlink()
    (folder / "start").touch()
    outcome = asyncio.run(run_cell(server.url, "/v1/embeddings", bodies(model, texts[length], size, length),
                                   concurrency, seconds, warmup=0))
    (folder / "stop").touch()
    deadline = time.monotonic() + 30
    while not (found := list(folder.glob("samples-*.json"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    cell_info = {"model": model, "tokens": length, "cell": name, "concurrency": concurrency,
                 "texts_per_request": size, "tokens_per_s": outcome.summary()["tokens_per_s"]}
    if not found:
        return {"cell": cell_info, "error": "the server's worker wrote no samples"}
    return {"cell": cell_info, **json.loads(found[0].read_text())}


def main() -> None:
    out, scratch = Path(sys.argv[1]), Path(sys.argv[2])
    dry = "--dry-run" in sys.argv
    shapes, cells = (DRY_MODELS, DRY_CELLS) if dry else (MODELS, CELLS)
    seconds, warmup = (0.5, 0.2) if dry else (10.0, 2.0)
    from embedding_worker.config import bundled_model_path

    vocab = str(Path(bundled_model_path()) / "vocab.txt")
    texts = {length: fixed_tokens(vocab, 1024, length, seed=length) for length in LENGTHS}
    began = time.perf_counter()
    paths = {name: make_bert(scratch / "models" / name, layers=s.layers, hidden=s.hidden,
                             heads=s.heads, intermediate=s.intermediate, window=max(LENGTHS))
             for name, s in shapes.items()}
    print(f"models generated in {time.perf_counter() - began:.1f} s", flush=True)
    folder = scratch / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join([str(HERE / "hook"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    server = BentoServer({
        "MODEL_NAMES": ";".join(str(p) for p in paths.values()),
        "SERVED_MODEL_NAMES": ";".join(paths),
        "BACKEND": "torch", "DEVICE": "cpu" if dry else "auto", "DTYPES": "auto",
        "REQUEST_TIMEOUT": "600", "LOG_REQUESTS": "false",
        "PYTHONPATH": pythonpath, "GPU_CHECK_PROFILE": str(folder),
    }, scratch / "throughput-server.log")
    began = time.perf_counter()
    server.start(timeout=300)
    ready = time.perf_counter() - began
    report = {"server_ready_s": ready, "models": {k: asdict(v) for k, v in shapes.items()},
              "cell_seconds": seconds, "cells": [], "profile": None}

    def save(rows: list[dict]) -> None:
        out.write_text(json.dumps({**report, "cells": rows}, indent=1))

    try:
        report["cells"] = measure(server, shapes, cells, seconds, warmup, texts, save)
        report["profile"] = profile(server, folder, "base", max(LENGTHS), cells[-1], seconds, texts)
        out.write_text(json.dumps(report, indent=1))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
