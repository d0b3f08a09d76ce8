"""End to end in a real store: an in-process Qdrant collection (`qdrant-client`, ":memory:") built
from the service's dense, sparse and multi-vector outputs of a small corpus (BGE-M3, one request),
queried by hybrid search (dense + sparse fused by RRF) and by MaxSim over the multi-vectors, gives
the same top results as the same collection built from FlagEmbedding's vectors."""

from __future__ import annotations

import pytest

from conftest import running
from models import make_tiny_m3
from references import FLAG_EMBEDDING, WITHOUT_TRAINING_IMPORTS, run

CORPUS = [f"{a} {b} of the {c}" for a, b, c in [
    ("lantern", "light", "harbour"), ("tides", "turning", "autumn"), ("copper", "wire", "workshop"),
    ("quartz", "crystals", "mountain"), ("boats", "coming home", "evening"),
    ("meadow", "flowers", "spring"), ("signal", "towers", "coast"), ("orbit", "of satellites", "earth"),
    ("harbour", "walls", "old town"), ("autumn", "leaves", "forest"), ("storm", "clouds", "sea"),
    ("mountain", "paths", "summer")]]
QUERIES = ["light in the harbour", "autumn tides", "crystals on the mountain"]
REFERENCE = WITHOUT_TRAINING_IMPORTS + """
from FlagEmbedding import BGEM3FlagModel
model = BGEM3FlagModel(ARGS["model"], use_fp16=False, devices="cpu")
def encode(texts):
    out = model.encode(texts, max_length=128, return_dense=True, return_sparse=True,
                       return_colbert_vecs=True)
    return [{"dense": d.tolist(), "sparse": {"indices": [int(k) for k in w],
                                              "values": [float(v) for v in w.values()]},
             "multi": c.tolist()}
            for d, w, c in zip(out["dense_vecs"], out["lexical_weights"], out["colbert_vecs"])]
print(json.dumps({"corpus": encode(ARGS["corpus"]), "queries": encode(ARGS["queries"])}))
"""


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    return make_tiny_m3(tmp_path_factory.mktemp("m3") / "tiny-m3")


async def service_vectors(core, texts):
    got = await core.embeddings.create({"model": "m3", "input": texts, "return_dense": True,
                                        "return_sparse": True, "return_multivector": True})
    return [{"dense": d["dense_embedding"], "sparse": d["sparse_embedding"],
             "multi": [list(map(float, v)) for v in d["embedding"]]} for d in got["data"]]


def collection(vectors):
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    size = len(vectors[0]["dense"])
    client.create_collection(
        "docs",
        vectors_config={
            "dense": models.VectorParams(size=size, distance=models.Distance.COSINE),
            "colbert": models.VectorParams(
                size=size, distance=models.Distance.COSINE,
                multivector_config=models.MultiVectorConfig(
                    comparator=models.MultiVectorComparator.MAX_SIM)),
        },
        sparse_vectors_config={"sparse": models.SparseVectorParams()})
    client.upsert("docs", [
        models.PointStruct(id=i, vector={
            "dense": [float(x) for x in v["dense"]], "colbert": v["multi"],
            "sparse": models.SparseVector(indices=v["sparse"]["indices"],
                                          values=v["sparse"]["values"])})
        for i, v in enumerate(vectors)])
    return client


def searches(client, query):
    from qdrant_client import models

    hybrid = client.query_points("docs", prefetch=[
        models.Prefetch(query=[float(x) for x in query["dense"]], using="dense", limit=8),
        models.Prefetch(query=models.SparseVector(indices=query["sparse"]["indices"],
                                                  values=query["sparse"]["values"]),
                        using="sparse", limit=8),
    ], query=models.FusionQuery(fusion=models.Fusion.RRF), limit=3).points
    maxsim = client.query_points("docs", query=query["multi"], using="colbert", limit=3).points
    return [p.id for p in hybrid], [p.id for p in maxsim]


async def test_hybrid_and_maxsim_search_find_what_the_reference_finds(request, m3):
    cache = request.config.cache.mkdir("reference-libraries")
    reference = run(cache, FLAG_EMBEDDING, REFERENCE, model=str(m3), corpus=CORPUS, queries=QUERIES)
    async with running(model_names=str(m3), served_model_names="m3", dtypes="fp32") as core:
        corpus = await service_vectors(core, CORPUS)
        queries = await service_vectors(core, QUERIES)
    ours, theirs = collection(corpus), collection(reference["corpus"])
    for mine, expected in zip(queries, reference["queries"]):
        got, want = searches(ours, mine), searches(theirs, expected)
        assert got == want and all(len(ids) == 3 for ids in got)
