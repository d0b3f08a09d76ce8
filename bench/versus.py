"""This service at its defaults against Infinity's own server at each dtype, on the cells that
matter at concurrency >= 16, one server up at a time, rounds alternated (A, B, C, A, B, C).

Infinity's server runs from bench/.venv-infinity (bench/README.md) with `--dtype float32` and
`--dtype bfloat16`; the report keeps both and names the faster one per cell. The CPU's name and
flags are recorded with the result (bf16 speed depends on AMX).

    .venv/bin/python bench/versus.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from load import run_cell  # noqa: E402
from run import (  # noqa: E402
    INFINITY_PY,
    Target,
    bench_models,
    body_maker,
    targets,
    tree_cpu_seconds,
)
from runtimes import cpu  # noqa: E402

CELLS = [{"kind": "embed", "concurrency": 16, "size": 8, "format": "float"},
         {"kind": "embed", "concurrency": 64, "size": 1, "format": "float"},
         {"kind": "rerank", "concurrency": 16, "size": 32, "format": "float"}]


def at_each_dtype(infinity: Target, out: Path) -> list[Target]:
    """Infinity's server at `--dtype float32` and at `bfloat16` (which is faster depends on the
    CPU: bf16 on AMX)."""
    return [Target(f"infinity-{dtype}", [*infinity.command, "--dtype", dtype], infinity.env,
                   infinity.ready_path, infinity.prefix, out / f"infinity-{dtype}.log")
            for dtype in ("float32", "bfloat16")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        default=HERE / "results" / f"versus-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    if not INFINITY_PY.exists():
        sys.exit(f"{INFINITY_PY} missing: see bench/README.md to create Infinity's environment")
    args.out.mkdir(parents=True, exist_ok=True)
    models, corpus, tokens = bench_models()
    worker, _, infinity = targets(models, args.out)
    servers = {server.name: server for server in (worker, *at_each_dtype(infinity, args.out))}
    rows: list[dict] = []
    for round_ in range(args.rounds):
        for name, server in servers.items():
            server.start()
            try:
                for cell in CELLS:
                    path = server.prefix + ("/rerank" if cell["kind"] == "rerank" else "/embeddings")
                    outcome = asyncio.run(run_cell(
                        server.url, path, body_maker(cell, corpus, tokens), cell["concurrency"],
                        args.seconds, server_cpu=partial(tree_cpu_seconds, server.proc.pid)))
                    row = {"server": name, "round": round_, **cell, **outcome.summary()}
                    rows.append(row)
                    print(f"{name:18s} {cell['kind']:6s} c={cell['concurrency']:<3d} "
                          f"n={cell['size']:<3d} {row['items_per_s']:8.1f} items/s  p50 "
                          f"{row['p50_ms']:7.1f} ms  errors {row['errors']}", flush=True)
            finally:
                server.stop()
    result = {"cpu": cpu(), "seconds": args.seconds, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"CPU: {result['cpu']}")
    for cell in CELLS:
        def rate(name: str) -> float:
            got = [r["items_per_s"] for r in rows if r["server"] == name
                   and all(r[k] == cell[k] for k in ("kind", "concurrency", "size"))]
            return sum(got) / len(got)

        best = max(("infinity-float32", "infinity-bfloat16"), key=rate)
        print(f"{cell['kind']} c={cell['concurrency']} n={cell['size']}: worker "
              f"{rate('worker'):.1f}, {best} {rate(best):.1f} items/s -> "
              f"{rate('worker') / rate(best):.2f}x")


if __name__ == "__main__":
    main()
