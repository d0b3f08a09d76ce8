"""Issue 34's side-by-side in one run: this service at its defaults, Infinity's server at each
dtype (the faster one kept per cell), and the in-process limit (the lean engine's model on the
runtime and precision this CPU gets, tokenisation and pooling included, best batch, no server),
rounds alternated A, B, C, A, B, C.

The servers are loaded by `wrk` (C, one thread: it leaves a 2-core server its cores), replaying
each cell's request bodies (`bench/wrk_bodies.lua`); wrk's own CPU is reported beside the
server's. The in-process limit runs in a child process on the same texts the cell sends, sorted
by length, at its best batch of 16-128. Reported per cell: items/s, the server's (or the
process's) CPU ms per item, and the ratios the issue sets targets on (>= 1.5x Infinity's best,
>= 0.8x the in-process limit). The CPU's name and flags go with the result.

    apt-get install wrk
    .venv/bin/python bench/limit.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from run import INFINITY_PY, bench_models, body_maker, targets, tree_cpu_seconds  # noqa: E402
from runtimes import cpu  # noqa: E402
from versus import CELLS, at_each_dtype  # noqa: E402

BODIES = 2000  # distinct request bodies a cell cycles through
LIMIT_ITEMS = 512  # items the in-process limit embeds (or pairs it scores) per cell


def cell_name(cell: dict) -> str:
    return f"{cell['kind']} c={cell['concurrency']} n={cell['size']}"


def cell_items(cell: dict, corpus: list[str], tokens: list[int]) -> list:
    """What the cell's requests carry, in order: texts, or (query, document) pairs."""
    make, items = body_maker(cell, corpus, tokens), []
    for i in range(BODIES):
        body = make(i)[0]
        if cell["kind"] == "rerank":
            items += [(body["query"], doc) for doc in body["documents"]]
        else:
            items += body["input"] if isinstance(body["input"], list) else [body["input"]]
        if len(items) >= LIMIT_ITEMS:
            return items[:LIMIT_ITEMS]
    return items


def engine_model(models: dict[str, Path], name: str):
    """The bench's model `name` ("minilm" or "reranker") as the server's engine opens it."""
    from embedding_worker.config import Settings, onnx_cache_dirs
    from embedding_worker.engine.combined import onnx_plans
    from embedding_worker.engine.ort import OrtEngine

    settings = Settings(model_names=str(models[name]), served_model_names=name)
    engine = OrtEngine(settings, onnx_plans(settings, "cpu", onnx_cache_dirs(settings)))
    engine.load()
    return engine.models[name]


def in_process(cell: dict, models: dict[str, Path]) -> dict:
    """Run in a child (`--in-process`): the model as the server's engine opens it."""
    model = engine_model(models, "reranker" if cell["kind"] == "rerank" else "minilm")
    _, corpus, tokens = bench_models()
    items = cell_items(cell, corpus, tokens)
    lengths = model.count_tokens([i if isinstance(i, str) else " ".join(i) for i in items])
    items = [item for _, item in sorted(zip(lengths, items), key=lambda pair: pair[0])]
    best = {"items_per_s": 0.0}
    for batch in (16, 32, 64, 128):
        chunks = [items[at:at + batch] for at in range(0, len(items), batch)]
        for chunk in chunks:  # warm-up: every shape met once
            model.embed_now(chunk)
        start, cpu_start = time.perf_counter(), time.process_time()
        for chunk in chunks:
            model.embed_now(chunk)
        rate = len(items) / (time.perf_counter() - start)
        if rate > best["items_per_s"]:
            best = {"items_per_s": rate, "batch": batch,
                    "cpu_ms_per_item": (time.process_time() - cpu_start) * 1000 / len(items)}
    return {**best, "runtime": model.info.runtime, "dtype": model.info.dtype}


def run_wrk(url: str, path: str, bodies: Path, concurrency: int, seconds: float) -> dict:
    env = {"WRK_BODIES": str(bodies), "PATH": "/usr/bin:/bin"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{round(seconds)}s", "--timeout", "120s",
                           "-s", str(HERE / "wrk_bodies.lua"), url + path],
                          env=env, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    failed = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"requests_per_s": rate, "non_2xx": int(failed.group(1)) if failed else 0,
            "socket_errors": errors.group(1) if errors else "",
            "wrk_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def serve_cells(server, cells: list[dict], bodies: dict[str, Path], per_request: dict[str, int],
                seconds: float) -> list[dict]:
    rows = []
    server.start()
    try:
        for cell in cells:
            path = server.prefix + ("/rerank" if cell["kind"] == "rerank" else "/embeddings")
            items = per_request[cell_name(cell)]
            # wrk counts the requests done within its time: those in flight at the end are lost,
            # so a cell of multi-second requests (rerank) gets 3x the time to keep that small
            span = seconds * (3 if cell["kind"] == "rerank" else 1)
            run_wrk(server.url, path, bodies[cell_name(cell)], cell["concurrency"], 3)  # warm-up
            cpu_start = tree_cpu_seconds(server.proc.pid)
            got = run_wrk(server.url, path, bodies[cell_name(cell)], cell["concurrency"], span)
            server_cpu = tree_cpu_seconds(server.proc.pid) - cpu_start
            done = got["requests_per_s"] * span * items
            rows.append({"server": server.name, "cell": cell_name(cell),
                         "items_per_s": got["requests_per_s"] * items,
                         "server_cpu_ms_per_item": server_cpu * 1000 / max(done, 1),
                         "wrk_cpu_ms_per_item": got["wrk_cpu_s"] * 1000 / max(done, 1),
                         "non_2xx": got["non_2xx"], "socket_errors": got["socket_errors"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in-process", metavar="CELL", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=HERE / "results" / f"limit-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    models, corpus, tokens = bench_models()
    if args.in_process:
        print(json.dumps(in_process(json.loads(args.in_process), models)))
        return
    if not shutil.which("wrk"):
        sys.exit("wrk missing: apt-get install wrk")
    if not INFINITY_PY.exists():
        sys.exit(f"{INFINITY_PY} missing: see bench/README.md to create Infinity's environment")
    args.out.mkdir(parents=True, exist_ok=True)
    bodies, per_request = {}, {}
    for cell in CELLS:
        make = body_maker(cell, corpus, tokens)
        per_request[cell_name(cell)] = make(0)[1]  # items a request carries: the same in a cell
        bodies[cell_name(cell)] = args.out / f"bodies-{cell['kind']}-{cell['concurrency']}.jsonl"
        bodies[cell_name(cell)].write_text(
            "".join(json.dumps(make(i)[0]) + "\n" for i in range(BODIES)))
    worker, _, infinity = targets(models, args.out)
    servers = [worker, *at_each_dtype(infinity, args.out)]
    rows: list[dict] = []
    for _ in range(args.rounds):
        for cell in CELLS:
            child = subprocess.run([sys.executable, __file__, "--in-process", json.dumps(cell)],
                                   capture_output=True, text=True, check=True)
            got = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"server": "in-process", "cell": cell_name(cell), **got})
            print(json.dumps(rows[-1]), flush=True)
        for server in servers:
            rows += serve_cells(server, CELLS, bodies, per_request, args.seconds)
    summary = summarize(rows)
    (args.out / "results.json").write_text(json.dumps(
        {"cpu": cpu(), "seconds": args.seconds, "rows": rows, "summary": summary}, indent=1))
    print("CPU:", cpu())
    print("| cell | this service | in-process limit | Infinity's best | vs limit | vs Infinity "
          "| server / limit CPU ms per item | wrk CPU ms per item |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for line in summary:
        print(f"| {line['cell']} | {line['worker']:.1f} | {line['limit']:.1f} "
              f"({line['limit_runtime']}) | {line['infinity']:.1f} ({line['infinity_dtype']}) "
              f"| {line['vs_limit']:.2f}x | {line['vs_infinity']:.2f}x "
              f"| {line['worker_cpu']:.1f} / {line['limit_cpu']:.1f} | {line['wrk_cpu']:.2f} |")


def summarize(rows: list[dict]) -> list[dict]:
    def mean(server: str, cell: str, key: str) -> float:
        values = [r[key] for r in rows if r["server"] == server and r["cell"] == cell]
        return sum(values) / len(values)

    lines = []
    for cell in map(cell_name, CELLS):
        best = max(("infinity-float32", "infinity-bfloat16"),
                   key=lambda s: mean(s, cell, "items_per_s"))
        worker, limit = mean("worker", cell, "items_per_s"), mean("in-process", cell, "items_per_s")
        infinity = mean(best, cell, "items_per_s")
        runtime = next(r for r in rows if r["server"] == "in-process" and r["cell"] == cell)
        lines.append({"cell": cell, "worker": worker, "limit": limit, "infinity": infinity,
                      "infinity_dtype": best.removeprefix("infinity-"),
                      "limit_runtime": f"{runtime['runtime']} {runtime['dtype']}",
                      "vs_limit": worker / limit, "vs_infinity": worker / infinity,
                      "worker_cpu": mean("worker", cell, "server_cpu_ms_per_item"),
                      "limit_cpu": mean("in-process", cell, "cpu_ms_per_item"),
                      "wrk_cpu": mean("worker", cell, "wrk_cpu_ms_per_item")})
    return lines


if __name__ == "__main__":
    main()
