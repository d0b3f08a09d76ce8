"""What a start costs, side by side: `embedding-worker serve` (one process), RunPod mode,
`bentoml serve` (arbiter + worker) and Infinity's own server, on bench/run.py's two models.

    .venv/bin/python bench/startup.py [--starts 5] [--out bench/results/startup-NAME]

For each page-cache state (warm; cold: the kernel's page cache dropped before each start, which
needs root) the servers start in turn, alternating, `--starts` times: process start to ready and
to the first embedding (medians, all values kept). Then each server once more for memory: the
process tree's RSS at idle (2 s after its first embedding) and its peak under one load cell
(c=16, 8 texts per request). Also the export case: the second start of a model that needed an
ONNX export (found in the cache) against one that ships its `.onnx` file. Writes results.json
and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import run_cell  # noqa: E402
from run import (  # noqa: E402
    Target,
    bench_models,
    prepare_run,
    body_maker,
    free_port,
    process_tree,
    targets,
    tree_cpu_seconds,
)

LOAD_CELL = {"kind": "embed", "concurrency": 16, "size": 8, "format": "float"}


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def tree_rss(pid: int) -> float:
    try:
        return sum(p.memory_info().rss for p in process_tree(pid)) / 2**20
    except psutil.Error:
        return 0.0


def servers(models: dict[str, Path], out: Path) -> list[Target]:
    chosen = targets(models, out)
    worker = next(t for t in chosen if t.name == "worker")
    env = {**worker.env, "PORT": str(free_port())}
    chosen.append(Target("bentoml-serve", [sys.executable, "-m", "bentoml", "serve",
                                           "service:InfinityEmbedding", "--host", "127.0.0.1",
                                           "--port", env["PORT"]], env, "/readyz", "/v1",
                         out / "bentoml-serve.log"))
    return chosen


def cold_starts(chosen: list[Target], rounds: int, cold: bool) -> dict[str, list[dict]]:
    starts: dict[str, list[dict]] = {t.name: [] for t in chosen}
    for _ in range(rounds):
        for target in chosen:
            if cold:
                drop_page_cache()
            try:
                starts[target.name].append(target.start())
            finally:
                target.stop()
            print(target.name, "cold" if cold else "warm", starts[target.name][-1], flush=True)
    return starts


def memory(target: Target, corpus, tokens) -> dict[str, float]:
    target.start()
    try:
        time.sleep(2)
        idle = tree_rss(target.proc.pid)
        target.peak_rss = 0
        path = target.prefix + "/embeddings" if not target.job else None
        if path is None:
            return {"idle_rss_mb": idle}
        outcome = asyncio.run(run_cell(target.url, path, body_maker(LOAD_CELL, corpus, tokens),
                                       LOAD_CELL["concurrency"], 8.0,
                                       server_cpu=partial(tree_cpu_seconds, target.proc.pid)))
        return {"idle_rss_mb": idle, "load_peak_rss_mb": target.peak_rss / 2**20,
                "load_items_per_s": outcome.summary()["items_per_s"]}
    finally:
        target.stop()


def export_case(models: dict[str, Path], out: Path, rounds: int) -> dict[str, list[float]]:
    """Second starts: MiniLM exported at its first start (found in the cache after) against a
    copy that ships the same export as onnx/model.onnx."""
    cache = Path(tempfile.mkdtemp(prefix="onnx-cache-", dir=out))
    shipped = out / "minilm-shipped"
    base = next(t for t in targets(models, out) if t.name == "worker")

    def server(model: Path, name: str) -> Target:
        env = {**base.env, "PORT": str(free_port()), "MODEL_NAMES": str(model),
               "SERVED_MODEL_NAMES": "minilm", "ONNX_CACHE": str(cache)}
        return Target(name, base.command, env, "/readyz", "/v1", out / f"{name}.log")

    exported = server(models["minilm"], "exported")
    first = exported.start()  # makes the export
    exported.stop()
    if not shipped.exists():
        shutil.copytree(models["minilm"], shipped)
        (export_dir,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
        (shipped / "onnx").mkdir()
        for file in export_dir.glob("model.onnx*"):  # the graph and its weights
            shutil.copy(file, shipped / "onnx" / file.name)
    timed: dict[str, list[float]] = {"first_start_with_export_s": [first["cold_start_first_embedding_s"]],
                                     "exported": [], "shipped": []}
    ships = server(shipped, "shipped")
    for _ in range(rounds):
        for name, target in (("exported", exported), ("shipped", ships)):
            timed[name].append(target.start()["cold_start_first_embedding_s"])
            target.stop()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--only", nargs="+", metavar="SERVER",
                        help="these servers only (worker, worker-runpod, bentoml-serve; infinity "
                             "always runs: the ratios are to it)")
    parser.add_argument("--starts-only", action="store_true", help="no memory or export part")
    parser.add_argument("--out", type=Path,
                        default=HERE / "results" / time.strftime("startup-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    prepare_run(args.out)
    models, corpus, tokens = bench_models()
    chosen = [t for t in servers(models, args.out)
              if not args.only or t.name in args.only or t.name == "infinity"]
    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(),
                                "cores": os.cpu_count(),
                                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
                    "starts": {}, "memory": {}}
    can_drop = drop_page_cache()
    for cold in ([False, True] if can_drop else [False]):
        starts = cold_starts(chosen, args.starts, cold)
        report["starts"]["cold" if cold else "warm"] = {
            name: {key: {"median": statistics.median(s[key] for s in runs),
                         "all": [s[key] for s in runs]}
                   for key in runs[0]} for name, runs in starts.items()}
    if not args.starts_only:
        for target in chosen:
            report["memory"][target.name] = memory(target, corpus, tokens)
            print(target.name, report["memory"][target.name], flush=True)
        report["export"] = export_case(models, args.out, args.starts)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    infinity = report["starts"]["warm"]["infinity"]["cold_start_first_embedding_s"]["median"]
    print("\n| page cache | server | start to ready (s) | to first embedding (s) | vs Infinity |")
    print("| --- | --- | --- | --- | --- |")
    for state, rows in report["starts"].items():
        base = rows["infinity"]["cold_start_first_embedding_s"]["median"]
        for name, row in rows.items():
            first = row["cold_start_first_embedding_s"]["median"]
            print(f"| {state} | {name} | {row['cold_start_ready_s']['median']:.2f} | {first:.2f} | "
                  f"{first / base:.2f}x |")
    if args.starts_only:
        return
    print("\n| server | idle RSS (MB) | peak RSS under load (MB) | vs Infinity (idle, load) |")
    print("| --- | --- | --- | --- |")
    theirs = report["memory"]["infinity"]
    for name, row in report["memory"].items():
        load = row.get("load_peak_rss_mb")
        ratio = f"{row['idle_rss_mb'] / theirs['idle_rss_mb']:.2f}x" + (
            f", {load / theirs['load_peak_rss_mb']:.2f}x" if load else "")
        print(f"| {name} | {row['idle_rss_mb']:.0f} | {load or 0:.0f} | {ratio} |")
    export = report["export"]
    print(f"\nexport: first start {export['first_start_with_export_s'][0]:.2f} s; second starts "
          f"median {statistics.median(export['exported']):.2f} s (exported) vs "
          f"{statistics.median(export['shipped']):.2f} s (shipped)")
    print(f"(warm Infinity median {infinity:.2f} s)")


if __name__ == "__main__":
    main()
