"""On a CPU a batch runs as length-sorted groups (engine/grouping.py): each row must come back in its
place with the numbers of the whole batch, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import running, torch_logits
from embedding_worker.engine import grouping
from embedding_worker.config import bundled_model_path

# Queries and passages in one batch: more than GROUP_TOKENS once padded, so several groups.
MIXED = [("short query %d" % i) if i % 3 else ("passage words about item %d " % i) * (4 + 3 * i)
         for i in range(30)]


def test_token_groups_keep_each_row_once_within_the_budget():
    lengths = [5, 300, 40, 40, 7, 1200, 90, 3, 250]
    groups = grouping.token_groups(lengths, 512)
    assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
    for group in groups:
        assert max(lengths[r] for r in group) * len(group) <= 512 or len(group) == 1
    assert [5] in groups  # a row past the budget runs alone
    assert grouping.token_groups([], 512) == []
    assert grouping.token_groups([10] * 8, 1024) == [list(range(8))]


def test_groups_fill_the_shapes_a_runtime_pads_to():
    """With OpenVINO's few shapes, a group cut short by the budget keeps only the rows its padded
    shape holds (no padding rows), the budget holds for the padded shape, and every row comes
    back once; the last group alone may pad."""
    from embedding_worker.engine.runtime import bucketed

    rng = np.random.default_rng(3)
    shape = lambda rows, width: bucketed(rows, width, 512)  # noqa: E731
    padded_rows = {"plain": 0, "shaped": 0}
    for _ in range(200):
        lengths = rng.integers(3, 200, rng.integers(1, 64)).tolist()
        groups = grouping.token_groups(lengths, 1024, shape)
        assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
        for group in groups:
            rows, width = shape(len(group), max(lengths[r] for r in group))
            assert rows * width <= 1024 or len(group) == 1
        for group in groups[:-1]:
            assert shape(len(group), max(lengths[r] for r in group))[0] == len(group)
        for name, made in (("plain", grouping.token_groups(lengths, 1024)), ("shaped", groups)):
            padded_rows[name] += sum(shape(len(g), 1)[0] - len(g) for g in made)
    assert padded_rows["shaped"] * 3 < padded_rows["plain"]
    # an identity shape groups exactly as no shape does
    lengths = rng.integers(3, 200, 100).tolist()
    assert grouping.token_groups(lengths, 512, lambda r, w: (r, w)) == grouping.token_groups(lengths, 512)


@pytest.fixture(scope="module", params=["torch", "optimum"])
async def core(request, tiny_models):
    async with running(backend=request.param,
                       model_names=f"{bundled_model_path()};{tiny_models['rerank']}",
                       served_model_names="minilm;tiny-rerank") as core:
        assert core.engine.ready, core.engine.failure
        yield core


async def test_a_mixed_batch_runs_in_groups_and_keeps_its_order(core, tiny_models):
    from sentence_transformers import SentenceTransformer

    model = core.models.get("minilm")
    lengths = [min(n, model.info.window) for n in model.count_tokens(MIXED)]  # as padded
    assert len(grouping.token_groups(lengths, grouping.GROUP_TOKENS)) > 2
    result = await core.embeddings.create({"model": "minilm", "input": MIXED})
    st = SentenceTransformer(bundled_model_path(), device="cpu")
    got = np.array([d["embedding"] for d in result["data"]])
    np.testing.assert_allclose(got, st.encode(MIXED, normalize_embeddings=True), atol=2e-5)

    query = "where do items sit"
    result = await core.rerank.create({"model": "tiny-rerank", "query": query, "documents": MIXED,
                                "raw_scores": True})
    got = {r["index"]: r["relevance_score"] for r in result["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(MIXED))],
                               torch_logits(tiny_models["rerank"], query, MIXED), atol=1e-5)
