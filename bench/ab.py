"""A/B of one server setting on one load cell: the same `bentoml serve`, started once per variant,
alternating A, B, A, B so drift hits both.

    .venv/bin/python bench/ab.py LOG_REQUESTS=true LOG_REQUESTS=false [--concurrency 4] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from load import run_cell  # noqa: E402
from server import BentoServer  # noqa: E402

from embedding_worker.config import BUNDLED_MODEL_ID  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    def body(i: int) -> tuple[dict, int, int]:
        return {"model": BUNDLED_MODEL_ID, "input": [f"short query number {i}"]}, 1, 0

    rows = []
    for _ in range(args.rounds):
        for variant in (args.a, args.b):
            key, _, value = variant.partition("=")
            with tempfile.TemporaryDirectory() as tmp:
                srv = BentoServer({key: value}, Path(tmp) / "server.log").start()
                try:
                    cell = asyncio.run(run_cell(srv.url, "/v1/embeddings", body, args.concurrency,
                                                args.seconds)).summary()
                finally:
                    srv.stop()
            rows.append((variant, cell))
            print(f"{variant}: {cell['items_per_s']:.1f} items/s, p50 {cell['p50_ms']:.1f} ms, "
                  f"errors {cell['errors']}", flush=True)


if __name__ == "__main__":
    main()
