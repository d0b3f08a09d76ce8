"""The in-process limit on this CPU: the bundled MiniLM through the lean engine's own model class
(tokenisation, length grouping, pooling, as the server runs it) on each runtime and precision,
alternated A, B, C, A, B, C so that drift hits each alike.

Texts: `--texts` of 16-72 tokens each (whole vocabulary words, so one token a word), embedded in
length-sorted batches of `--batch`. Reported per variant: items/s (median and best round), the
process's CPU seconds per item, and the lowest cosine of its vectors against ONNX Runtime fp32's.
The CPU's name and its bf16/AMX flags are recorded with every result.

    .venv/bin/python bench/runtimes.py [--texts 1280] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

from workload import _words  # noqa: E402

from embedding_worker.config import Settings, bundled_model_path  # noqa: E402
from embedding_worker.engine import onnx_export  # noqa: E402
from embedding_worker.engine.ort import OrtModel  # noqa: E402
from embedding_worker.engine.runtime import (  # noqa: E402
    BF16,
    FP32,
    ONNXRUNTIME,
    OPENVINO,
    Choice,
    cpu_flags,
    cpu_name,
)

VARIANTS = {
    "onnxruntime-fp32": Choice(ONNXRUNTIME, FP32, "bench"),
    "openvino-fp32": Choice(OPENVINO, FP32, "bench"),
    "openvino-bf16": Choice(OPENVINO, BF16, "bench"),
}
FLAGS_OF_NOTE = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f",
                 "avx2")


def workload(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    words = _words(str(Path(bundled_model_path()) / "vocab.txt"))
    return [" ".join(rng.choice(words) for _ in range(rng.randint(14, 70))) for _ in range(n)]


def cpu() -> dict:
    flags = cpu_flags()
    return {"name": cpu_name(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS_OF_NOTE if f in flags]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    cache = os.environ.get("ONNX_CACHE") or tempfile.mkdtemp(prefix="bench-onnx-")
    settings = Settings(model_names=bundled_model_path())
    spec = settings.models[0]
    plan = onnx_export.prepare(spec.source, cache)
    names = args.variants.split(",")
    models = {name: OrtModel(spec, plan, settings, VARIANTS[name]) for name in names}

    texts = sorted(workload(args.texts), key=len)
    batches = [texts[i:i + args.batch] for i in range(0, len(texts), args.batch)]
    for model in models.values():  # warm: first runs compile and allocate
        model.embed_now(batches[0])
        model.embed_now(batches[-1])

    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu_per_item: dict[str, list[float]] = {name: [] for name in names}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            rows = []
            wall, cpu0 = time.perf_counter(), time.process_time()
            for batch in batches:
                rows += model.embed_now(batch)
            wall, used = time.perf_counter() - wall, time.process_time() - cpu0
            rates[name].append(len(texts) / wall)
            cpu_per_item[name].append(1000 * used / len(texts))
            vectors[name] = np.asarray(rows)

    def unit(m: np.ndarray) -> np.ndarray:
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    reference = unit(vectors[names[0]])
    result = {"cpu": cpu(), "texts": len(texts), "batch": args.batch, "rounds": args.rounds,
              "variants": {}}
    print(f"CPU: {result['cpu']['name']} ({result['cpu']['cores']} cores; "
          f"{' '.join(result['cpu']['flags'])})")
    print("| variant | items/s median | best | CPU ms/item | min cosine vs " + names[0] + " |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        cosine = float((unit(vectors[name]) * reference).sum(1).min())
        entry = {"items_per_s": rates[name], "cpu_ms_per_item": cpu_per_item[name],
                 "min_cosine": cosine}
        result["variants"][name] = entry
        print(f"| {name} | {statistics.median(rates[name]):.0f} | {max(rates[name]):.0f} | "
              f"{statistics.median(cpu_per_item[name]):.2f} | {cosine:.6f} |")
    out = ROOT / "bench" / "results" / f"runtimes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
