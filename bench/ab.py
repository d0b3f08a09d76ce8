"""A/B of one server setting or one code change on one load cell: the same `bentoml serve`,
started once per variant, alternating A, B, A, B so drift hits both.

A variant is `VAR=value` (an environment setting) or `@REV` (that git revision, checked out into
a temporary worktree and served from there; `@` alone is the working tree).

    .venv/bin/python bench/ab.py LOG_REQUESTS=true LOG_REQUESTS=false [--concurrency 4] [--seconds 8]
    .venv/bin/python bench/ab.py @HEAD~1 @ --size 8 --concurrency 16 --env BACKEND=torch

`--size 0` (default) sends one short query per request; `--size N` sends N texts of the
benchmark's mix (half short queries, half passages), as `bench/run.py` does. `--rerank` serves
`bench/run.py`'s cross-encoder instead and sends its rerank requests (a query and 32 documents).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from load import run_cell  # noqa: E402
from run import body_maker, make_reranker, process_tree, tree_cpu_seconds  # noqa: E402
from server import BentoServer  # noqa: E402
from workload import texts  # noqa: E402

from embedding_worker.config import BUNDLED_MODEL_ID, bundled_model_path  # noqa: E402


def checkout(stack: ExitStack, variant: str) -> tuple[dict[str, str], Path]:
    """The environment and the root to serve a variant from."""
    if not variant.startswith("@"):
        key, _, value = variant.partition("=")
        return {key: value}, ROOT
    if variant == "@":
        return {}, ROOT
    tree = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree),
                    variant[1:]], check=True)
    stack.callback(subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False)
    return {}, tree


def peak_rss_mb(pid: int) -> float:
    """The server's peak resident memory: each process's high-water mark (VmHWM), summed."""
    total = 0
    for proc in process_tree(pid):
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--rerank", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="VAR=value",
                        help="a setting for both variants (the servers get no other from here)")
    args = parser.parse_args()
    if any("=" not in kv for kv in args.env):
        parser.error("--env takes VAR=value")

    corpus = texts(str(Path(bundled_model_path()) / "vocab.txt"), 2048)

    def embed_body(i: int) -> tuple[dict, int, int]:
        if not args.size:
            return {"model": BUNDLED_MODEL_ID, "input": [f"short query number {i}"]}, 1, 0
        start = (i * args.size) % (len(corpus) - args.size)
        return {"model": BUNDLED_MODEL_ID, "input": corpus[start:start + args.size]}, args.size, 0

    # as bench/run.py: Infinity's server has no deadline, and deep queues outlast ours (60 s)
    path, body = "/v1/embeddings", embed_body
    served = {"REQUEST_TIMEOUT": "600", **dict(kv.partition("=")[::2] for kv in args.env)}
    if args.rerank:
        reranker = make_reranker(ROOT / "bench" / "results" / "minilm-reranker", bundled_model_path())
        path = "/v1/rerank"
        served.update(MODEL_NAMES=str(reranker), SERVED_MODEL_NAMES="reranker")
        body = body_maker({"kind": "rerank"}, corpus, [0] * len(corpus))  # token counts unused

    with ExitStack() as stack:
        variants = {v: ({**served, **env}, root) for v, (env, root) in
                    ((v, checkout(stack, v)) for v in (args.a, args.b))}
        for _ in range(args.rounds):
            for variant, (env, root) in variants.items():
                with tempfile.TemporaryDirectory() as tmp:
                    srv = BentoServer(env, Path(tmp) / "server.log", root=root).start()
                    try:
                        cell = asyncio.run(run_cell(
                            srv.url, path, body, args.concurrency, args.seconds,
                            server_cpu=partial(tree_cpu_seconds, srv.proc.pid))).summary()
                        peak = peak_rss_mb(srv.proc.pid)
                    finally:
                        srv.stop()
                cpu_ms = cell["server_cpu_s"] * 1000 / max(cell["items"], 1)
                print(f"{variant}: {cell['items_per_s']:.1f} items/s, p50 {cell['p50_ms']:.1f} ms, "
                      f"p99 {cell['p99_ms']:.1f} ms, errors {cell['errors']}, server CPU "
                      f"{cpu_ms:.1f} ms/item, peak RSS {peak:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
