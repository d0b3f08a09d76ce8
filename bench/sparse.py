"""Sparse and multi-vectors (issue 35, point 7): this service's throughput through the server
against the reference library in process at its best batch size, alternated (A, B, A, B), and the
peak memory of one batch of 32 texts of 512 tokens in each.

    .venv/bin/python bench/sparse.py [--kind splade|m3|colbert] [--rounds 2] [--seconds 15]

`splade`: MiniLM-L6's encoder under a masked-LM head of BERT's vocabulary (30,522), in
sentence-transformers 5's SparseEncoder format, against SparseEncoder. `m3`: MiniLM-L6's encoder
with BGE-M3's two heads (CLS dense, lexical weights, ColBERT vectors), all three outputs asked
for, against FlagEmbedding's BGEM3FlagModel. `colbert`: MiniLM-L6 made a ColBERT model by PyLate
(its Dense projection to 128, [Q]/[D] markers, documents of at most 180 tokens), documents
encoded, against PyLate's `ColBERT.encode`. The heads are random; speed and memory do not care.
The references run in a child with their library first on its path (tests/references.py).
Loaded by this process's async client (its CPU is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from models import MAKE_PYLATE, write_splade_modules  # noqa: E402
from references import (FLAG_EMBEDDING, PYLATE, SENTENCE_TRANSFORMERS_5,  # noqa: E402
                        WITHOUT_TRAINING_IMPORTS, installed)
from run import Target, bench_models, free_port, run_child  # noqa: E402
from runtimes import cpu  # noqa: E402

BATCHES = (8, 16, 32, 64)
CONCURRENCY, PER_REQUEST = 16, 8
CHILD = """
import json, sys, time
args = json.loads(open(sys.argv[1]).read())
texts, long = args["texts"], args["long"]
if args["who"] == "reference" and args["kind"] == "splade":
    from sentence_transformers import SparseEncoder
    model = SparseEncoder(args["model"], device="cpu")
    encode = lambda items, batch: model.encode(items, batch_size=batch, convert_to_tensor=True)
elif args["who"] == "reference" and args["kind"] == "colbert":
    from pylate import models
    model = models.ColBERT(model_name_or_path=args["model"], device="cpu")
    encode = lambda items, batch: model.encode(items, batch_size=batch, is_query=False)
elif args["who"] == "reference":
    from FlagEmbedding import BGEM3FlagModel
    model = BGEM3FlagModel(args["model"], use_fp16=False, devices="cpu")
    encode = lambda items, batch: model.encode(items, batch_size=batch, max_length=512,
                                               return_dense=True, return_sparse=True,
                                               return_colbert_vecs=True)
else:
    from embedding_worker.config import Settings, onnx_cache_dirs
    from embedding_worker.engine.combined import onnx_plans
    from embedding_worker.engine.ort import OrtEngine
    settings = Settings(model_names=args["model"], served_model_names="model")
    engine = OrtEngine(settings, onnx_plans(settings, "cpu", onnx_cache_dirs(settings)))
    engine.load()
    model = engine.models["model"]
    encode = lambda items, batch: [model.embed_now(items[at:at + batch])
                                   for at in range(0, len(items), batch)]
def hwm():  # this process's peak RSS, MB (ru_maxrss would keep the parent's across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
before = hwm()
encode(long, 32)
peak = hwm()
best = 0.0
for batch in args["batches"]:
    encode(texts[:batch], batch)
    start = time.perf_counter()
    encode(texts, batch)
    best = max(best, len(texts) / (time.perf_counter() - start))
print(json.dumps({"items_per_s": best, "peak_before_batch_mb": before, "peak_mb": peak}))
"""


def make_model(kind: str, out: Path, minilm: Path) -> Path:
    if (out / "modules.json").is_file():
        return out
    if kind == "colbert":  # made and saved by PyLate itself
        code = "import json, sys\nARGS = json.loads(sys.argv[1])\n" + WITHOUT_TRAINING_IMPORTS
        arguments = {"raw": str(minilm), "path": str(out), "seed": 0, "query_length": 32,
                     "document_length": 180, "attend": False}
        done = subprocess.run([sys.executable, "-c", code + MAKE_PYLATE, json.dumps(arguments)],
                              env=reference_env("colbert"), capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        return out
    if kind == "splade":
        from transformers import AutoTokenizer, BertForMaskedLM

        BertForMaskedLM.from_pretrained(minilm).save_pretrained(out)  # the head: new, random
        AutoTokenizer.from_pretrained(minilm).save_pretrained(out)
        write_splade_modules(out, "max", window=512)
        return out
    import torch
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(minilm), max_seq_length=512)
    hidden = transformer.get_word_embedding_dimension()
    SentenceTransformer(modules=[transformer, models.Pooling(hidden, "cls"), models.Normalize()],
                        device="cpu").save(str(out))
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), out / "colbert_linear.pt")
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), out / "sparse_linear.pt")
    return out


def reference_env(kind: str) -> dict[str, str]:
    """This environment with the reference library of `kind` first on the path."""
    library = {"splade": SENTENCE_TRANSFORMERS_5, "m3": FLAG_EMBEDDING, "colbert": PYLATE}[kind]
    path = installed(HERE / "results" / ".reference", library)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}


def child(kind: str, who: str, model: Path, texts: list[str], long: list[str], out: Path) -> dict:
    env, code = dict(os.environ), CHILD
    if who == "reference":
        env = reference_env(kind)
        if kind in ("m3", "colbert"):
            code = "import sys\n" + WITHOUT_TRAINING_IMPORTS + CHILD
    args = {"kind": kind, "who": who, "model": str(model), "texts": texts, "long": long,
            "batches": BATCHES}
    return run_child(code, args, out, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("splade", "m3", "colbert"), default="splade")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--out", type=Path,
                        default=None)
    args = parser.parse_args()
    args.out = args.out or HERE / "results" / f"{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.out.mkdir(parents=True, exist_ok=True)
    models, corpus, _ = bench_models()
    model = make_model(args.kind, HERE / "results" / f"{args.kind}-minilm", models["minilm"])
    texts = corpus[:512]
    long = [" ".join(corpus[i:i + 40])[:4000] for i in range(32)]  # 512 tokens each, cut
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_NAMES", "SERVED_"))}
    env.update(PORT=str(free_port()), HOST="127.0.0.1", EMBEDDING_CACHE_MB="0",
               MODEL_NAMES=f"{models['minilm']};{model}", SERVED_MODEL_NAMES="minilm;model",
               REQUEST_TIMEOUT="600", BENTOML_DO_NOT_TRACK="true")
    server = Target("worker", [sys.executable, "-m", "embedding_worker", "serve"], env, "/readyz",
                    "/v1", args.out / "worker.log")

    def body(i: int):
        start = (i * PER_REQUEST) % (len(corpus) - PER_REQUEST)
        outputs = {"return_sparse": True} if args.kind == "splade" else {
            "return_multivector": True} if args.kind == "colbert" else {
            "return_dense": True, "return_sparse": True, "return_multivector": True}
        return ({"model": "model", "input": corpus[start:start + PER_REQUEST], **outputs},
                PER_REQUEST, 0)

    rows = []
    for _ in range(args.rounds):
        for who in ("reference", "lean-in-process"):
            rows.append({"who": who, **child(args.kind, who, model, texts, long, args.out)})
            print(json.dumps(rows[-1]), flush=True)
        rows.append({"who": "server",
                     **server.one_cell("/v1/embeddings", body, CONCURRENCY, args.seconds)})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=1))
    print("CPU:", cpu())
    for who in ("reference", "lean-in-process", "server"):
        rates = [r["items_per_s"] for r in rows if r["who"] == who]
        print(f"{who}: items/s {', '.join(f'{r:.1f}' for r in rates)}")


if __name__ == "__main__":
    main()
