"""ColBERT models on the CPU engine, held to PyLate (run beside this environment,
tests/references.py): a model PyLate itself made and saved (Transformer + Dense, [Q]/[D] markers
added to its vocabulary) and one in Stanford's `HF_ColBERT` format ([unused0]/[unused1], its
`linear` in the BERT's checkpoint, expansion tokens attended to). Query and document vectors,
MaxSim rerank scores, every route that gives multi-vectors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import MINILM, running
from embedding_worker.api.jobs import dispatch
from embedding_worker.config import bundled_model_path
from embedding_worker.core.errors import BadRequest
from embedding_worker.engine.base import Query
from models import MAKE_PYLATE, make_tiny_bert, make_tiny_hf_colbert
from references import PYLATE, WITHOUT_TRAINING_IMPORTS, run

QUERIES = ["what is a cat?", "tides"]
DOCUMENTS = ["A cat, a small animal; it purrs.", "Tides rise and fall twice a day (mostly).",
             "quartz " * 30]  # past the document length: cut
REFERENCE = WITHOUT_TRAINING_IMPORTS + """
import numpy as np
from pylate import models, scores
out = {}
for name, path in ARGS["models"].items():
    model = models.ColBERT(model_name_or_path=path, device="cpu")
    q = model.encode(ARGS["queries"], is_query=True)
    d = model.encode(ARGS["documents"], is_query=False)
    # the first query against each document
    maxsim = [float(np.asarray(scores.colbert_scores([q[0]], [x]))[0, 0]) for x in d]
    out[name] = {"queries": [x.tolist() for x in q], "documents": [x.tolist() for x in d],
                 "maxsim": maxsim}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("colbert")
    cache = request.config.cache.mkdir("reference-libraries")
    pylate = root / "tiny-pylate"
    run(cache, PYLATE, WITHOUT_TRAINING_IMPORTS + MAKE_PYLATE, raw=str(make_tiny_bert(root / "raw")),
        path=str(pylate), seed=3, query_length=12, document_length=24, attend=False)
    stanford = make_tiny_hf_colbert(root / "tiny-hf-colbert", attend_to_mask_tokens=True)
    return {"pylate": str(pylate), "stanford": str(stanford)}


@pytest.fixture(scope="module")
def reference(request, models):
    cache = request.config.cache.mkdir("reference-libraries")
    return run(cache, PYLATE, REFERENCE, models=models, queries=QUERIES, documents=DOCUMENTS)


@pytest.fixture(scope="module")
async def core(models):
    async with running(model_names=f"{models['pylate']};{models['stanford']};{bundled_model_path()}",
                       served_model_names=f"pylate;stanford;{MINILM}",
                       dtypes="fp32;fp32;auto") as core:
        assert core.engine.ready, core.engine.failure
        yield core


def assert_vectors(items, expected):
    assert len(items) == len(expected)
    for item, rows in zip(items, expected):
        got = np.asarray(item["embedding"] if isinstance(item, dict) else item)
        assert got.shape == np.asarray(rows).shape
        np.testing.assert_allclose(got, rows, atol=1e-5)


@pytest.mark.parametrize("name", ["pylate", "stanford"])
async def test_queries_and_documents_as_pylate_encodes_them(core, reference, name):
    expected = reference[name]
    queries = await core.embeddings.create({"model": name, "input": QUERIES,
                                            "return_multivector": True, "input_type": "query"})
    assert_vectors(queries["data"], expected["queries"])
    assert {len(q) for q in expected["queries"]} == {12}  # expanded to the query length
    documents = await core.embeddings.create({"model": name, "input": DOCUMENTS,
                                              "return_multivector": True,
                                              "input_type": "document"})
    assert_vectors(documents["data"], expected["documents"])
    # documents by default; queries by Jina's task and by prompt name too
    default = await core.embeddings.create({"model": name, "input": DOCUMENTS,
                                            "return_multivector": True})
    assert_vectors(default["data"], expected["documents"])
    for asked in ({"task": "retrieval.query"}, {"prompt_name": "query"},
                  {"input_type": "search_query"}):
        got = await core.embeddings.create({"model": name, "input": QUERIES,
                                            "return_multivector": True, **asked})
        assert_vectors(got["data"], expected["queries"])
    # a query and a document of the same text in one engine batch: each encoded as its role
    alone = await core.embeddings.create({"model": name, "input": QUERIES[0],
                                          "return_multivector": True})
    rows, _ = await core.models.get(name).embed([Query(QUERIES[0]), QUERIES[0]])
    assert_vectors([rows[0].multi, rows[1].multi],
                   [expected["queries"][0], alone["data"][0]["embedding"]])
    assert len(rows[1].multi) < len(rows[0].multi)  # no expansion, punctuation skipped


async def test_it_reranks_by_maxsim_as_pylate_scores(core, reference):
    for name in ("pylate", "stanford"):
        maxsim = reference[name]["maxsim"]  # PyLate's colbert_scores: sums of the best matches
        raw = await core.rerank.create({"model": name, "query": QUERIES[0],
                                        "documents": DOCUMENTS, "raw_scores": True})
        got = {r["index"]: r["relevance_score"] for r in raw["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], maxsim, rtol=1e-5)
        assert [r["index"] for r in raw["results"]] == list(np.argsort(maxsim)[::-1])
        # by default the mean over the query's vectors (in [-1, 1]); Cohere's and TEI's routes too
        plain = await core.rerank.create({"model": name, "query": QUERIES[0],
                                          "documents": DOCUMENTS})
        length = len(reference[name]["queries"][0])
        np.testing.assert_allclose(sorted(r["relevance_score"] for r in plain["results"]),
                                   sorted(np.asarray(maxsim) / length), rtol=1e-5)
        tei = await core.tei.rerank({"query": QUERIES[0], "texts": DOCUMENTS}, model=name)
        np.testing.assert_allclose(sorted(r["score"] for r in tei),
                                   sorted(np.asarray(maxsim) / length), rtol=1e-5)


async def test_every_route_and_shape(core, reference):
    expected = reference["pylate"]
    packed = await core.embeddings.create({"model": "pylate", "input": DOCUMENTS[:1],
                                           "return_multivector": True,
                                           "encoding_format": "base64"})
    item = packed["data"][0]
    rows, dimensions = item["shape"]
    matrix = np.frombuffer(base64.b64decode(item["embedding"]), "<f4").reshape(rows, dimensions)
    np.testing.assert_allclose(matrix, expected["documents"][0], atol=1e-5)
    job = await dispatch(core, {"model": "pylate", "input": QUERIES, "return_multivector": True,
                                "input_type": "query"})
    assert_vectors(job["data"], expected["queries"])
    card = core.models.card("pylate")
    assert card["capabilities"] == ["multi_embed", "rerank", "token_embed"]
    # fewer dimensions: the first ones of each vector, each of unit length again
    cut = await core.embeddings.create({"model": "pylate", "input": DOCUMENTS[:1],
                                        "return_multivector": True, "dimensions": 8})
    first = np.asarray(expected["documents"][0])[:, :8]
    np.testing.assert_allclose(cut["data"][0]["embedding"],
                               first / np.linalg.norm(first, axis=1, keepdims=True), atol=1e-5)


async def test_what_a_colbert_model_cannot_give(core):
    with pytest.raises(BadRequest, match="does not support text embeddings.*multi-vectors"):
        await core.embeddings.create({"model": "pylate", "input": "x"})
    with pytest.raises(BadRequest, match="does not support sparse"):
        await core.embeddings.create({"model": "pylate", "input": "x", "return_sparse": True})
    with pytest.raises(BadRequest, match="does not support text embeddings"):  # dense only
        await core.embeddings.create({"model": "pylate", "input": ["a", "b"],
                                      "late_chunking": True})
    # a document past its length, with truncation refused: the window named
    with pytest.raises(BadRequest, match="over the model.s window of 23 tokens"):
        await core.embeddings.create({"model": "pylate", "input": DOCUMENTS[2],
                                      "return_multivector": True, "truncate": "NONE"})


async def test_at_the_default_precision(models, reference):
    """DTYPES=auto: bf16 on a CPU with AMX if its vectors pass the guard, else fp32; close to
    PyLate's fp32 vectors either way."""
    async with running(model_names=models["pylate"], served_model_names="pylate") as core:
        got = await core.embeddings.create({"model": "pylate", "input": DOCUMENTS,
                                            "return_multivector": True})
        queries = await core.embeddings.create({"model": "pylate", "input": QUERIES,
                                                "return_multivector": True,
                                                "input_type": "query"})
    pairs = [*zip(got["data"], reference["pylate"]["documents"]),
             *zip(queries["data"], reference["pylate"]["queries"])]
    for item, expected in pairs:
        vectors, expected = np.asarray(item["embedding"]), np.asarray(expected)
        assert vectors.shape == expected.shape and (vectors * expected).sum(1).min() > 0.999


async def test_on_torch(models, reference):
    """BACKEND=torch (what a GPU gets): the same engine around torch's forward pass (infinity
    cannot load PyLate's modules), the same vectors and scores."""
    async with running(model_names=f"{models['pylate']};{models['stanford']}",
                       served_model_names="pylate;stanford", backend="torch") as core:
        assert core.engine.ready, core.engine.failure
        for name in ("pylate", "stanford"):
            card = core.models.card(name)
            assert (card["backend"], card["runtime"], card["dtype"]) == ("torch", "torch",
                                                                        "float32")
            queries = await core.embeddings.create({"model": name, "input": QUERIES,
                                                    "return_multivector": True,
                                                    "input_type": "query"})
            assert_vectors(queries["data"], reference[name]["queries"])
            documents = await core.embeddings.create({"model": name, "input": DOCUMENTS,
                                                      "return_multivector": True})
            assert_vectors(documents["data"], reference[name]["documents"])
            raw = await core.rerank.create({"model": name, "query": QUERIES[0],
                                            "documents": DOCUMENTS, "raw_scores": True})
            got = {r["index"]: r["relevance_score"] for r in raw["results"]}
            np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))],
                                       reference[name]["maxsim"], rtol=1e-5)
