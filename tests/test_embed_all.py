"""TEI's `/embed_all`: each input's last hidden states, a vector per token (special tokens
included), held to transformers' `last_hidden_state` on the tiny model (fp32) and on MiniLM at
the default precision (bf16 on a CPU with AMX: each token's vector to cosine 0.999)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MINILM, hidden_states, running
from embedding_worker.config import bundled_model_path
from embedding_worker.core.errors import BadRequest

TEXTS = ["the tides of autumn", "a lantern in the harbour at night"]


@pytest.fixture(scope="module")
async def core(tiny_models):
    async with running(model_names=f"{bundled_model_path()};{tiny_models['embed']};"
                                   f"{tiny_models['rerank']}",
                       served_model_names=f"{MINILM};tiny;tiny-rerank",
                       dtypes="auto;fp32;fp32") as core:
        yield core


async def test_token_states_as_transformers_computes_them(core, tiny_models):
    got = await core.tei.embed_all({"inputs": TEXTS}, model="tiny")
    for rows, expected in zip(got, hidden_states(str(tiny_models["embed"]) + "/raw", TEXTS)):
        np.testing.assert_allclose(np.asarray(rows), expected, atol=2e-5)
    got = await core.tei.embed_all({"inputs": TEXTS})  # the first model that has them: MiniLM
    for rows, expected in zip(got, hidden_states(bundled_model_path(), TEXTS)):
        rows = np.asarray(rows)
        assert rows.shape == expected.shape
        cosines = (rows * expected).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(expected, axis=1)
        assert cosines.min() > 0.999, cosines


async def test_a_model_without_them(core):
    with pytest.raises(BadRequest, match="does not support token embeddings"):
        await core.tei.embed_all({"inputs": TEXTS}, model="tiny-rerank")
