"""CPU cost of the response body: `encoding_format` float vs base64, through the service's own
encoding path (encoding.encode_rows + encoding.dumps) and, for reference, what a plain `json.dumps`
server pays for floats, and what the client pays to decode each.

    .venv/bin/python bench/serialization.py [--repeat 30]

Prints a markdown table: CPU milliseconds per response and bytes on the wire.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import time

import numpy as np
import orjson

from embedding_worker.encoding import dumps, encode_rows


def body(rows: list) -> dict:
    return {"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1},
            "data": [{"object": "embedding", "embedding": r, "index": i} for i, r in enumerate(rows)]}


def cpu_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):  # best of N: the least disturbed run
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"orjson {orjson.__version__}\n")
    print("| dims | rows | float: encode ms | base64: encode ms | base64/float | float json.dumps ms "
          "| float bytes | base64 bytes | client decode float ms | client decode base64 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dims in (384, 1024):
        for rows in (1, 32, 256):
            matrix = rng.standard_normal((rows, dims)).astype(np.float32)
            f_body = dumps(body(encode_rows(matrix, "float")))
            b_body = dumps(body(encode_rows(matrix, "base64")))
            f_ms = cpu_ms(lambda: dumps(body(encode_rows(matrix, "float"))), args.repeat)
            b_ms = cpu_ms(lambda: dumps(body(encode_rows(matrix, "base64"))), args.repeat)
            plain = cpu_ms(lambda: json.dumps(body(matrix.tolist())), args.repeat)

            def decode_float():
                return np.array([d["embedding"] for d in orjson.loads(f_body)["data"]], dtype=np.float32)

            def decode_b64():
                return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                                 for d in orjson.loads(b_body)["data"]])

            np.testing.assert_array_equal(decode_float(), decode_b64())
            print(f"| {dims} | {rows} | {f_ms:.3f} | {b_ms:.3f} | {b_ms / f_ms:.2f} | {plain:.3f} "
                  f"| {len(f_body)} | {len(b_body)} | {cpu_ms(decode_float, args.repeat):.3f} "
                  f"| {cpu_ms(decode_b64, args.repeat):.3f} |")


if __name__ == "__main__":
    main()
