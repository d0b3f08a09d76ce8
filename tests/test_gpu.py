"""The service's GPU paths through a real `bentoml serve` on CUDA: reduced precision against fp32
and the CPU, CLIP's image path, the reranker, a real CUDA out-of-memory contained to its request,
and the whole-batch path a GPU takes (no CPU grouping).

Skipped without CUDA. `GPU_TESTS_ON_CPU=1` (what `bench/gpu-check --dry-run` sets) runs them on
the CPU instead, so they cannot rot before a GPU comes: the same requests and checks, with fp32
where a GPU runs reduced precision; the out-of-memory case needs CUDA and skips. The measured
cosines go into the junit report's properties (bench/gpu-check copies them to its results)."""

from __future__ import annotations

import base64
import io
import os

import httpx
import numpy as np
import pytest

from conftest import running, torch_logits
from gpu_models import make_bert
from server import BentoServer

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("GPU_TESTS_ON_CPU") == "1"
# Queries and passages mixed, so that a batch pads (each word of these is one token).
TEXTS = [f"short query {i}" if i % 3 else "passage words about items " * (3 + 2 * i) for i in range(24)]
# The out-of-memory model: one layer whose feed-forward is 2**21 wide holds 16 MiB of fp32
# activations per token (its output and the GELU's), so a 512-token text needs 8 GiB and a short
# text well under 256 MiB. With all but HEADROOM of the card taken, only the short one fits.
OOM_WIDTH = 2**21
HEADROOM = 2**30
LONG = "words " * 600  # truncated to the window: 512 tokens
# five letters each and one token each for the bundled (bert-base-uncased) vocabulary
WORDS = ("water world house music light night power money point place south north media women "
         "party court field river black white green small large great young human death earth "
         "paper heart voice table order peace state union radio model price sound").split()


@pytest.fixture(scope="module")
def device() -> str:
    if ON_CPU:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (GPU_TESTS_ON_CPU=1 runs these on the CPU)")
    return "cuda"


@pytest.fixture(scope="module")
def server(device, tiny_models, tmp_path_factory):
    """One server for every model of this module (each start costs ~10-30 s): the tiny embedder
    at three precisions, the reranker at two, CLIP, a fused CLAP, and on CUDA the out-of-memory
    model."""
    from models import make_tiny_clap_audio

    clap = make_tiny_clap_audio(tmp_path_factory.mktemp("clap") / "tiny-clap", fusion=True)
    models = [("embed-auto", tiny_models["embed"], "auto"),
              ("embed-fp32", tiny_models["embed"], "float32"),
              ("rerank-auto", tiny_models["rerank"], "auto"),
              ("rerank-fp32", tiny_models["rerank"], "float32"),
              ("clip", tiny_models["clip"], "auto"),
              ("clap", clap, "auto")]
    if device == "cuda":
        wide = make_bert(tmp_path_factory.mktemp("oom") / "oom", layers=1, hidden=32, heads=2,
                         intermediate=OOM_WIDTH)
        models += [("embed-fp16", tiny_models["embed"], "float16"), ("oom", wide, "float32")]
    srv = BentoServer({
        "MODEL_NAMES": ";".join(str(path) for _, path, _ in models),
        "SERVED_MODEL_NAMES": ";".join(name for name, _, _ in models),
        "DTYPES": ";".join(dtype for _, _, dtype in models),
        "BACKEND": "torch",  # what a GPU serves (ONNX Runtime is the CPU's)
        "DEVICE": device,
        "BATCH_SIZES": "32",
    }, tmp_path_factory.mktemp("gpu-server") / "server.log")
    srv.models = [(name, path) for name, path, _ in models]
    yield srv.start(timeout=300)
    srv.stop()


def post(server: BentoServer, path: str, body: dict, status: int = 200) -> dict:
    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == status, f"{response.text}\n{server.logs()[-4000:]}"
    return response.json()


def embed(server: BentoServer, model: str, inputs: list[str], **body) -> np.ndarray:
    data = post(server, "/v1/embeddings", {"model": model, "input": inputs, **body})["data"]
    return np.array([d["embedding"] for d in data], dtype=np.float64)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def test_reduced_precision_matches_fp32_on_the_device_and_the_cpu(server, device, tiny_models,
                                                                    record_property):
    from sentence_transformers import SentenceTransformer

    cpu = SentenceTransformer(str(tiny_models["embed"]), device="cpu").encode(
        TEXTS, normalize_embeddings=True)
    fp32 = embed(server, "embed-fp32", TEXTS)
    record_property("cosine_min_fp32_vs_cpu", min_cosine(fp32, cpu))
    # "fp32" on CUDA multiplies in TF32: infinity turns it on when imported
    assert min_cosine(fp32, cpu) >= 0.9999
    # DTYPES=auto is bf16 on a GPU that has it, else fp16; fp32 on a CPU
    for name in ["embed-auto"] + (["embed-fp16"] if device == "cuda" else []):
        got = embed(server, name, TEXTS)
        record_property(f"cosine_min_{name}_vs_fp32", min_cosine(got, fp32))
        record_property(f"cosine_min_{name}_vs_cpu", min_cosine(got, cpu))
        assert min_cosine(got, fp32) >= 0.999, name
        assert min_cosine(got, cpu) >= 0.999, name


def _noise_image(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_clip_images_and_texts_on_the_device(server, tiny_models, record_property):
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    uris = [_noise_image(seed) for seed in range(4)]
    texts = ["a photo of a cat", "a red square"]
    images = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in uris]
    path = tiny_models["clip"]
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        cpu_images = model.get_image_features(**processor(images=images, return_tensors="pt"))
        cpu_texts = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True))

    got = embed(server, "clip", uris, modality="image")
    record_property("cosine_min_clip_images_vs_cpu", min_cosine(got, cpu_images.numpy()))
    # infinity runs CLIP in fp16 on CUDA under DTYPES=auto: looser than the embedder's bound
    assert min_cosine(got, cpu_images.numpy()) >= 0.99
    assert min_cosine(got[:1], got[1:2]) < 0.999  # different images, different vectors
    got = embed(server, "clip", texts, modality="text")
    assert min_cosine(got, cpu_texts.numpy()) >= 0.99


def test_clap_audio_and_texts_on_the_device(server, record_property):
    """A CLAP model (engine/clap_engine.py, torch on the device, float32 under DTYPES=auto): its
    clips and texts against the same model on the CPU."""
    from audiofiles import encoded, tone
    from embedding_worker.core.audio import decode
    from embedding_worker.engine.clap import Clap

    model_dir = next(path for name, path in server.models if name == "clap")
    files = [encoded(tone(48000, seconds, hertz), 48000)
             for seconds, hertz in ((0.5, 300.0), (1.0, 700.0), (2.5, 1100.0))]  # the last: long
    cpu = Clap(model_dir)
    texts = ["a dog barks", "rain on a tin roof"]
    got = embed(server, "clap", [base64.b64encode(data).decode() for data in files],
                modality="audio")
    expected = cpu.embed_audio([decode(data, cpu.rate).samples for data in files])
    record_property("cosine_min_clap_audio_vs_cpu", min_cosine(got, expected))
    assert min_cosine(got, expected) >= 0.999  # TF32 on CUDA (infinity turns it on)
    got = embed(server, "clap", texts)
    assert min_cosine(got, cpu.embed_text(texts)) >= 0.999


def test_reranker_on_the_device(server, device, tiny_models, record_property):
    query = "where do items sit"
    documents = [("passage words about item %d " % i) * (1 + i % 5) for i in range(12)]
    cpu = torch_logits(tiny_models["rerank"], query, documents)
    fp32 = 1e-4 if device == "cpu" else 2e-3  # TF32 on CUDA, as above
    for model, atol in (("rerank-fp32", fp32), ("rerank-auto", 2e-2)):
        results = post(server, "/v1/rerank", {"model": model, "query": query,
                                              "documents": documents, "raw_scores": True})["results"]
        scores = {r["index"]: r["relevance_score"] for r in results}
        got = np.array([scores[i] for i in range(len(documents))])
        record_property(f"max_abs_diff_{model}_vs_cpu", float(np.abs(got - cpu).max()))
        # bf16 keeps ~3 significant digits, and the tiny model's scores differ in the fourth,
        # so only closeness is checked at reduced precision, not the order
        np.testing.assert_allclose(got, cpu, atol=atol, err_msg=model)


async def test_a_batch_runs_whole_on_a_gpu_and_in_groups_on_a_cpu(device, tiny_models, monkeypatch):
    """engine/compat.py wraps the encoder in CPU grouping (engine/grouping.py) only when the
    device is the CPU: a GPU must get each engine batch in one forward pass, and its rows back in
    order with fp32's numbers."""
    from sentence_transformers import SentenceTransformer

    from embedding_worker.engine import grouping

    wrapped, shapes = [], []
    real_grouped, real_forward = grouping.grouped, SentenceTransformer.forward

    def grouped(core, *args, **kwargs):
        wrapped.append(core)
        return real_grouped(core, *args, **kwargs)

    def forward(self, features, *args, **kwargs):
        shapes.append(tuple(features["input_ids"].shape))
        return real_forward(self, features, *args, **kwargs)

    monkeypatch.setattr(grouping, "grouped", grouped)
    monkeypatch.setattr(SentenceTransformer, "forward", forward)
    # one engine batch: 32 different texts of one length in characters (the length batcher
    # keeps them together) and in tokens, 92, within the model's 128, so that a CPU group of
    # GROUP_TOKENS holds 11 of them
    texts = [" ".join(WORDS[(i + j * (1 + i % 7)) % len(WORDS)] for j in range(90)) for i in range(32)]
    async with running(model_names=str(tiny_models["embed"]), served_model_names="tiny",
                       backend="torch", dtypes="float32", device=device, batch_sizes="32") as core:
        assert core.engine.ready, core.engine.failure
        shapes.clear()  # the start-up probe's forward
        result = await core.embeddings.create({"model": "tiny", "input": texts})
    assert bool(wrapped) == (device == "cpu")
    assert sum(rows for rows, _ in shapes) == len(texts)
    if device == "cpu":
        assert len(shapes) > 1 and all(rows * width <= grouping.GROUP_TOKENS for rows, width in shapes)
    else:
        assert len(shapes) == 1, shapes
    got = np.array([d["embedding"] for d in result["data"]])
    reference = SentenceTransformer(str(tiny_models["embed"]), device="cpu").encode(
        texts, normalize_embeddings=True)
    atol = 1e-4 if device == "cpu" else 2e-3  # TF32 on CUDA (infinity turns it on at import)
    assert np.abs(reference[0] - reference[1]).max() > 10 * atol  # rows that differ: order shows
    np.testing.assert_allclose(got, reference, atol=atol)


def test_cuda_out_of_memory_fails_that_request_only(server, device):
    if device != "cuda":
        pytest.skip("a real CUDA out-of-memory needs CUDA")
    import torch

    post(server, "/v1/embeddings", {"model": "oom", "input": ["warm up"]})
    free, _ = torch.cuda.mem_get_info()
    if free <= 2 * HEADROOM:
        pytest.skip(f"only {free / 2**30:.1f} GiB free on the card")
    # This process takes all but HEADROOM of the card: the server's next large allocation fails
    # in CUDA's allocator for real.
    hog = torch.empty(free - HEADROOM, dtype=torch.uint8, device="cuda")
    try:
        error = post(server, "/v1/embeddings", {"model": "oom", "input": [LONG] * 4}, 500)["error"]
        assert error["code"] == "model_error", error
        assert "out of memory" in error["message"].lower(), error
        post(server, "/v1/embeddings", {"model": "oom", "input": ["the next request"]})
        post(server, "/v1/embeddings", {"model": "embed-auto", "input": ["another model"]})
    finally:
        del hog
        torch.cuda.empty_cache()
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    # with the card free again the same request succeeds: it was the memory, not the model
    post(server, "/v1/embeddings", {"model": "oom", "input": [LONG] * 4})


async def test_outputs_beyond_dense_on_the_device(device, tmp_path_factory, record_property):
    """SPLADE, BGE-M3 and ColBERT models where torch serves (the lean engine around torch's
    forward pass; float16 on a GPU for BGE-M3 and ColBERT, float32 for SPLADE) against the CPU
    engine's fp32 (which tests/test_sparse.py, test_m3.py and test_colbert.py hold to the
    reference libraries); late chunking from infinity's encoder on the device too."""
    from models import make_tiny_embedder, make_tiny_hf_colbert, make_tiny_m3, make_tiny_splade

    root = tmp_path_factory.mktemp("several-outputs")
    paths = {"m3": make_tiny_m3(root / "m3"), "splade": make_tiny_splade(root / "splade"),
             "colbert": make_tiny_hf_colbert(root / "colbert"),
             "embed": make_tiny_embedder(root / "embed")}
    texts = TEXTS[:8]

    async def outputs(**settings) -> dict:
        async with running(model_names=";".join(map(str, paths.values())),
                           served_model_names=";".join(paths), **settings) as core:
            assert core.engine.ready, core.engine.failure
            create = core.embeddings.create
            return {"cards": {name: core.models.card(name) for name in paths},
                    "m3": (await create({"model": "m3", "input": texts, "return_dense": True,
                                         "return_sparse": True, "return_multivector": True}))["data"],
                    "splade": (await create({"model": "splade", "input": texts,
                                             "return_sparse": True}))["data"],
                    "query": (await create({"model": "colbert", "input": texts,
                                            "return_multivector": True,
                                            "input_type": "query"}))["data"],
                    "document": (await create({"model": "colbert", "input": texts,
                                               "return_multivector": True}))["data"],
                    "late": (await create({"model": "embed", "input": texts,
                                           "late_chunking": True}))["data"]}

    got = await outputs(device=device, backend="torch" if device == "cpu" else "auto")
    expected = await outputs(device="cpu", backend="optimum")
    for name in ("m3", "splade", "colbert"):
        card = got["cards"][name]
        assert (card["runtime"], card["device"]) == ("torch", device), card
    assert got["cards"]["splade"]["dtype"] == "float32"
    assert got["cards"]["m3"]["dtype"] == ("float16" if device == "cuda" else "float32")

    def worst_token_cosine(a: list, b: list) -> float:
        return min(min_cosine(np.asarray(x["embedding"], np.float64),
                              np.asarray(y["embedding"], np.float64)) for x, y in zip(a, b))

    cosines = {
        "m3_dense": min_cosine(np.array([d["dense_embedding"] for d in got["m3"]]),
                               np.array([d["dense_embedding"] for d in expected["m3"]])),
        "m3_multi": worst_token_cosine(got["m3"], expected["m3"]),
        "colbert_query": worst_token_cosine(got["query"], expected["query"]),
        "colbert_document": worst_token_cosine(got["document"], expected["document"]),
        "late_chunks": min_cosine(np.array([d["embedding"] for d in got["late"]]),
                                  np.array([d["embedding"] for d in expected["late"]])),
    }
    for name, cosine in cosines.items():
        record_property(f"cosine_min_{name}_vs_cpu", cosine)
        assert cosine >= 0.999, (name, cosine)
    for got_row, expected_row in zip(got["splade"], expected["splade"]):
        entries = dict(zip(got_row["sparse_embedding"]["indices"],
                           got_row["sparse_embedding"]["values"]))
        strong = {i: v for i, v in zip(expected_row["sparse_embedding"]["indices"],
                                       expected_row["sparse_embedding"]["values"]) if v > 0.05}
        assert strong and all(abs(entries.get(i, 0.0) - v) <= 0.02 * v + 1e-3
                              for i, v in strong.items())
