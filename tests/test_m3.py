"""BGE-M3 on the CPU engine: dense, sparse (lexical weights) and multi-vector (ColBERT) outputs
from one forward pass, held to FlagEmbedding's `BGEM3FlagModel` (run beside this environment,
tests/references.py) on a tiny generated BGE-M3 (random weights, its two heads saved as
FlagEmbedding saves them). Sparse entries of 1e-4 or less are not compared (fp32 rounding in two
runtimes may put a weight either side of ReLU's zero)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import MINILM, running
from embedding_worker.api.jobs import dispatch
from embedding_worker.config import bundled_model_path
from embedding_worker.core.errors import BadRequest
from embedding_worker.core.schemas import RerankItem
from models import make_tiny_m3
from references import FLAG_EMBEDDING, WITHOUT_TRAINING_IMPORTS, run

TEXTS = ["the tides of autumn", "a lantern in the harbour at night, and the boats coming home",
         "quartz and copper"]
REFERENCE = WITHOUT_TRAINING_IMPORTS + """
from FlagEmbedding import BGEM3FlagModel
model = BGEM3FlagModel(ARGS["model"], use_fp16=False, devices="cpu")
out = model.encode(ARGS["texts"], max_length=128, return_dense=True, return_sparse=True,
                   return_colbert_vecs=True)
print(json.dumps({"dense": out["dense_vecs"].tolist(),
                  "sparse": [{k: float(v) for k, v in w.items()} for w in out["lexical_weights"]],
                  "colbert": [c.tolist() for c in out["colbert_vecs"]]}))
"""


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    return make_tiny_m3(tmp_path_factory.mktemp("m3") / "tiny-m3")


@pytest.fixture(scope="module")
def reference(request, m3):
    cache = request.config.cache.mkdir("reference-libraries")
    return run(cache, FLAG_EMBEDDING, REFERENCE, model=str(m3), texts=TEXTS)


@pytest.fixture(scope="module")
async def core(m3):
    async with running(model_names=f"{m3};{bundled_model_path()}",
                       served_model_names=f"m3;{MINILM}", dtypes="fp32;auto") as core:
        assert core.engine.ready, core.engine.failure
        yield core


def assert_sparse(entries, expected: dict):
    got = dict(zip(entries["indices"], entries["values"]))
    big = {int(k) for k, v in expected.items() if v > 1e-4} | {k for k, v in got.items() if v > 1e-4}
    assert big
    np.testing.assert_allclose([got.get(k, 0.0) for k in sorted(big)],
                               [expected.get(str(k), 0.0) for k in sorted(big)], rtol=1e-4, atol=1e-6)


def assert_as_flag_embedding(items, reference):
    """All three outputs of each item as FlagEmbedding's fp32 ones."""
    for i, item in enumerate(items):
        np.testing.assert_allclose(item["dense_embedding"], reference["dense"][i], atol=1e-5)
        np.testing.assert_allclose(np.asarray(item["embedding"]), reference["colbert"][i],
                                   atol=1e-5)
        assert_sparse(item["sparse_embedding"], reference["sparse"][i])


async def test_three_outputs_as_flag_embedding_computes_them(core, reference):
    got = await core.embeddings.create({"model": "m3", "input": TEXTS, "return_dense": True,
                                        "return_sparse": True, "return_multivector": True})
    assert_as_flag_embedding(got["data"], reference)
    # the plain route gives the same dense vectors
    plain = await core.embeddings.create({"model": "m3", "input": TEXTS})
    np.testing.assert_allclose([d["embedding"] for d in plain["data"]], reference["dense"], atol=1e-5)
    card = core.models.card("m3")
    assert card["capabilities"] == ["embed", "multi_embed", "rerank", "sparse_embed",
                                    "token_embed"]


async def test_one_forward_pass_for_every_output(core):
    model = core.models.get("m3")
    calls, run_session = [], model.session.run

    def counting(feed):
        calls.append(feed["input_ids"].shape)
        return run_session(feed)

    model.session.run = counting
    try:
        await core.embeddings.create({"model": "m3", "input": TEXTS})
        dense_only = len(calls)
        calls.clear()
        await core.embeddings.create({"model": "m3", "input": TEXTS, "return_dense": True,
                                      "return_sparse": True, "return_multivector": True})
        assert len(calls) == dense_only and sum(shape[0] for shape in calls) >= len(TEXTS)
    finally:
        model.session.run = run_session


async def test_shapes_of_the_answer(core, reference):
    sparse = await core.embeddings.create({"model": "m3", "input": TEXTS[:1], "return_sparse": True,
                                           "sparse_top_k": 2, "sparse_tokens": True})
    item = sparse["data"][0]
    assert len(item["embedding"]) == 32  # the dense vector beside the sparse one, by default
    assert len(item["sparse_embedding"]["indices"]) == 2 == len(item["sparse_embedding"]["tokens"])
    packed = await core.embeddings.create({"model": "m3", "input": TEXTS[:1],
                                           "return_multivector": True, "encoding_format": "base64"})
    item = packed["data"][0]
    rows, dimensions = item["shape"]
    matrix = np.frombuffer(base64.b64decode(item["embedding"]), "<f4").reshape(rows, dimensions)
    np.testing.assert_allclose(matrix, reference["colbert"][0], atol=1e-5)
    assert "dense_embedding" not in item  # not asked for
    tei = await core.tei.embed_sparse({"inputs": TEXTS}, model="m3")
    for row, expected in zip(tei, reference["sparse"]):
        assert_sparse({"indices": [e["index"] for e in row], "values": [e["value"] for e in row]},
                      expected)
    job = await dispatch(core, {"model": "m3", "input": TEXTS, "return_multivector": True})
    for item, expected in zip(job["data"], reference["colbert"]):
        np.testing.assert_allclose(np.asarray(item["embedding"]), expected, atol=1e-5)


async def test_what_a_model_cannot_give(core):
    with pytest.raises(BadRequest, match="does not support multi-vectors"):
        await core.embeddings.create({"model": MINILM, "input": "x", "return_multivector": True})
    with pytest.raises(BadRequest, match="multi-vectors are float"):
        await core.embeddings.create({"model": "m3", "input": "x", "return_multivector": True,
                                      "output_dtype": "int8"})
    with pytest.raises(BadRequest, match="dimensions: 999 is out of range"):
        await core.embeddings.create({"model": "m3", "input": "x", "return_sparse": True,
                                      "dimensions": 999})
    with pytest.raises(BadRequest, match="dimensions: 999 is out of range"):
        await core.embeddings.create({"model": "m3", "input": "x", "return_multivector": True,
                                      "dimensions": 999})
    with pytest.raises(BadRequest, match="late_chunking gives dense vectors only"):
        await core.embeddings.create({"model": "m3", "input": ["a", "b"], "late_chunking": True,
                                      "return_sparse": True})


async def test_it_reranks_by_maxsim(core, reference):
    """Scores as FlagEmbedding's `colbert_score` of the reference's vectors (mean over the
    query's vectors of their best match); raw scores their sum; every rerank dialect."""
    query, documents = TEXTS[0], TEXTS[1:] + ["autumn tides"]
    vectors = await core.embeddings.create({"model": "m3", "input": [query, *documents],
                                            "return_multivector": True})
    q, *docs = [np.asarray(d["embedding"]) for d in vectors["data"]]
    np.testing.assert_allclose(q, reference["colbert"][0], atol=1e-5)
    expected = [(q @ d.T).max(1).mean() for d in docs]
    got = await core.rerank.create({"model": "m3", "query": query, "documents": documents})
    scores = {r["index"]: r["relevance_score"] for r in got["results"]}
    np.testing.assert_allclose([scores[i] for i in range(len(documents))], expected, atol=1e-5)
    assert [r["index"] for r in got["results"]] == list(np.argsort(expected)[::-1])
    raw = await core.rerank.create({"model": "m3", "query": query, "documents": documents,
                                    "raw_scores": True})
    np.testing.assert_allclose(sorted(r["relevance_score"] for r in raw["results"]),
                               sorted(np.array(expected) * len(q)), atol=1e-4)
    tei = await core.tei.rerank({"query": query, "texts": documents, "raw_scores": False},
                                model="m3")
    np.testing.assert_allclose(sorted(r["score"] for r in tei), sorted(expected), atol=1e-5)
    # BentoML's /batch/rerank items, each its own (query, document)
    batch = await core.rerank.items([RerankItem(model="m3", query=query, document=d)
                                     for d in documents])
    np.testing.assert_allclose(batch, expected, atol=1e-5)


async def test_at_the_default_precision(m3, reference):
    """DTYPES=auto: bf16 on a CPU with AMX (OpenVINO), if its dense vectors pass the guard;
    elsewhere fp32. All three outputs stay close to FlagEmbedding's fp32 ones either way."""
    async with running(model_names=str(m3), served_model_names="m3") as core:
        got = await core.embeddings.create({"model": "m3", "input": TEXTS, "return_dense": True,
                                            "return_sparse": True, "return_multivector": True})
    for i, item in enumerate(got["data"]):
        dense, expected = np.asarray(item["dense_embedding"]), np.asarray(reference["dense"][i])
        assert dense @ expected > 0.9999
        multi, colbert = np.asarray(item["embedding"]), np.asarray(reference["colbert"][i])
        assert multi.shape == colbert.shape and (multi * colbert).sum(1).min() > 0.999
        entries = dict(zip(item["sparse_embedding"]["indices"], item["sparse_embedding"]["values"]))
        strong = {int(k): v for k, v in reference["sparse"][i].items() if v > 0.05}
        assert strong and all(abs(entries.get(k, 0.0) - v) <= 0.02 * v + 1e-3
                              for k, v in strong.items())


async def test_on_torch(m3, reference):
    """BACKEND=torch (what a GPU gets): the same engine around torch's forward pass, so all three
    outputs (infinity would give the dense vector only), as FlagEmbedding computes them."""
    async with running(model_names=str(m3), served_model_names="m3", backend="torch") as core:
        assert core.engine.ready, core.engine.failure
        card = core.models.card("m3")
        assert (card["backend"], card["runtime"], card["dtype"]) == ("torch", "torch", "float32")
        got = await core.embeddings.create({"model": "m3", "input": TEXTS, "return_dense": True,
                                            "return_sparse": True, "return_multivector": True})
    assert_as_flag_embedding(got["data"], reference)
