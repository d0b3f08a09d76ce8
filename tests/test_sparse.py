"""Sparse vectors from SPLADE models on the CPU engine, held to sentence-transformers 5's
`SparseEncoder` (run beside this environment: tests/references.py): the same non-zero entries,
values within 1e-4 relative. Random weights put many logits near zero, where fp32 rounding in
two runtimes may land either side of ReLU's zero: entries of 1e-4 or less are not compared."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MINILM, running
from embedding_worker.config import bundled_model_path
from embedding_worker.core.errors import BadRequest
from models import make_tiny_splade
from references import SENTENCE_TRANSFORMERS_5, run

TEXTS = ["the tides of autumn", "a lantern in the harbour at night, and the boats coming home",
         "quartz"]
REFERENCE = """
from sentence_transformers import SparseEncoder
model = SparseEncoder(ARGS["model"], device="cpu")
rows = model.encode(ARGS["texts"], convert_to_tensor=True).to_dense().numpy()
print(json.dumps({"rows": rows.tolist(), "top": [model.decode(r, top_k=3) for r in
                  model.encode(ARGS["texts"][:1], convert_to_tensor=True)]}))
"""


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    root = tmp_path_factory.mktemp("splade")
    return {"st": make_tiny_splade(root / "st"), "sum": make_tiny_splade(root / "sum", pooling="sum"),
            "mlm": make_tiny_splade(root / "mlm", st_format=False)}


@pytest.fixture(scope="module")
def reference(request, splade):
    cache = request.config.cache.mkdir("reference-libraries")
    return {name: run(cache, SENTENCE_TRANSFORMERS_5, REFERENCE, model=str(path), texts=TEXTS)
            for name, path in splade.items()}


@pytest.fixture(scope="module")
async def core(splade):
    async with running(model_names=f"{splade['st']};{splade['sum']};{splade['mlm']};"
                                   f"{bundled_model_path()}",
                       served_model_names=f"splade;splade-sum;splade-mlm;{MINILM}") as core:
        assert core.engine.ready, core.engine.failure
        yield core


def dense(entries, size=30522):
    row = np.zeros(size)
    row[entries["indices"]] = entries["values"]
    return row


def assert_same(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    bigger = (got > 1e-4) | (expected > 1e-4)
    assert bigger.sum() > 100  # a real vector, not an empty one
    np.testing.assert_allclose(got[bigger], expected[bigger], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["splade", "splade-sum", "splade-mlm"])
async def test_as_sentence_transformers_computes_them(core, reference, name):
    key = {"splade": "st", "splade-sum": "sum", "splade-mlm": "mlm"}[name]
    got = await core.embeddings.create({"model": name, "input": TEXTS, "return_sparse": True})
    for item, expected in zip(got["data"], reference[key]["rows"]):
        entries = item["sparse_embedding"]
        assert entries["indices"] == sorted(entries["indices"]) and min(entries["values"]) > 0
        assert_same(dense(entries), expected)
    assert "embedding" not in got["data"][0]
    assert got["usage"]["prompt_tokens"] > 0
    card = core.models.card(name)
    assert card["capabilities"] == ["sparse_embed"] and card["dimensions"] == 30522


async def test_top_k_tokens_and_tei(core, reference):
    got = await core.embeddings.create({"model": "splade", "input": TEXTS[:1], "return_sparse": True,
                                        "sparse_top_k": 3, "sparse_tokens": True})
    entries = got["data"][0]["sparse_embedding"]
    top = reference["st"]["top"][0]  # [(token, value)] best first
    assert sorted(entries["tokens"]) == sorted(token for token, _ in top)
    np.testing.assert_allclose(sorted(entries["values"]), sorted(v for _, v in top), rtol=1e-4)
    tei = await core.tei.embed_sparse({"inputs": TEXTS}, model="splade")
    for row, expected in zip(tei, reference["st"]["rows"]):
        assert_same(dense({"indices": [e["index"] for e in row],
                           "values": [e["value"] for e in row]}), expected)
    assert await core.tei.embed_sparse({"inputs": "quartz"}) == tei[2:]  # the first sparse model


async def test_what_cannot_be_sparse(core):
    with pytest.raises(BadRequest, match="does not support sparse embeddings"):
        await core.embeddings.create({"model": MINILM, "input": "x", "return_sparse": True})
    with pytest.raises(BadRequest, match="does not support text embeddings; it supports: sparse"):
        await core.embeddings.create({"model": "splade", "input": "x"})
    for extra in ({"dimensions": 8}, {"output_dtype": "int8"}):
        with pytest.raises(BadRequest, match="applies to dense vectors and multi-vectors"):
            await core.embeddings.create({"model": "splade", "input": "x", "return_sparse": True,
                                          **extra})


async def test_on_torch(splade, reference):
    """BACKEND=torch (what a GPU gets): the same engine around torch's forward pass (infinity has
    no sparse output), the same numbers; a plain embedder beside it stays infinity's."""
    async with running(model_names=f"{splade['st']};{splade['mlm']};{bundled_model_path()}",
                       served_model_names=f"splade;splade-mlm;{MINILM}", backend="torch") as core:
        assert core.engine.ready, core.engine.failure
        for name, key in (("splade", "st"), ("splade-mlm", "mlm")):
            card = core.models.card(name)
            assert (card["backend"], card["runtime"], card["dtype"]) == ("torch", "torch", "float32")
            got = await core.embeddings.create({"model": name, "input": TEXTS,
                                                "return_sparse": True})
            for item, expected in zip(got["data"], reference[key]["rows"]):
                assert_same(dense(item["sparse_embedding"]), expected)
        minilm = core.models.card(MINILM)
        assert (minilm["backend"], minilm["runtime"]) == ("torch", None)  # infinity's
