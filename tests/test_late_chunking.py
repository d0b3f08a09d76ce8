"""Late chunking (Jina's `late_chunking`): one document's chunks, each embedded in the context of
the whole, held to Jina's published algorithm computed here with transformers (torch): the
chunks joined with a space, one forward pass, each chunk's vector the mean of its token span (the
first span from the leading [CLS], the last to the trailing [SEP])."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MINILM, assert_like, hidden_states, running
from embedding_worker.api.jobs import dispatch
from embedding_worker.config import bundled_model_path
from embedding_worker.core.errors import BadRequest
from embedding_worker.engine.late_chunking import owners, windows
from models import make_tiny_embedder

CHUNKS = ["Berlin is the capital of Germany.",
          "Its population is about 3.8 million.",
          "The city is also one of the states of the country.",
          "It hosts many museums and the famous Brandenburg Gate."]


def jina_reference(model_dir, chunks, prefix="", window=None):
    """Jina's late chunking: spans of token indices from the chunks' character starts (the way
    its `chunk_by_sentences` annotates them), `chunked_pooling` as the mean of each span. With
    `window`, a longer document's inner tokens are read in consecutive runs, each between the
    document's [CLS] and [SEP] ([CLS]'s state from the first run, [SEP]'s from the last)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    text = prefix + " ".join(chunks)
    inputs = tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
    offsets = inputs.pop("offset_mapping")[0].tolist()
    starts = [len(prefix) + sum(len(c) + 1 for c in chunks[:i]) for i in range(len(chunks))]
    bounds = [0] + [next(t for t, (s, e) in enumerate(offsets) if e > s and s >= start)
                    for start in starts[1:]] + [len(offsets)]
    ids = inputs["input_ids"][0]
    n = len(ids)
    runs = [list(range(n))] if window is None or n <= window else [
        [0, *range(at, min(at + window - 2, n - 1)), n - 1] for at in range(1, n - 1, window - 2)]
    states = [None] * n
    with torch.no_grad():
        for k, run in enumerate(runs):
            out = model(input_ids=ids[run][None]).last_hidden_state[0]
            for row, position in enumerate(run):
                if position in (0, n - 1) and k not in ((0,) if position == 0 else (len(runs) - 1,)):
                    continue
                states[position] = out[row].numpy()
    rows = np.stack([np.mean(states[a:b], axis=0) for a, b in zip(bounds, bounds[1:])])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def alone(model_dir, chunks):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(chunks, normalize_embeddings=True)


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory):
    return make_tiny_embedder(tmp_path_factory.mktemp("cls") / "m", pooling="cls")


@pytest.fixture(scope="module")
async def core(tiny_models, cls_model):
    async with running(model_names=f"{bundled_model_path()};{tiny_models['embed']};{cls_model}",
                       served_model_names=f"{MINILM};tiny;tiny-cls", dtypes="auto;fp32;fp32",
                       prompts=";query=query: |passage=passage: ;") as core:
        assert core.engine.ready, core.engine.failure
        yield core


def matrix(result):
    return np.array([d["embedding"] for d in result["data"]])


async def test_minilm_chunks_as_jina_computes_them(core):
    got = await core.embeddings.create({"model": MINILM, "input": CHUNKS, "late_chunking": True})
    expected = jina_reference(bundled_model_path(), CHUNKS)
    assert_like(matrix(got), expected)  # the default precision: bf16 on a CPU with AMX
    # in context, not alone: a chunk's vector has seen the rest of the document
    cosines = (matrix(got) * alone(bundled_model_path(), CHUNKS)).sum(1)
    assert cosines.max() < 0.99, cosines
    usage = await core.embeddings.create({"model": MINILM, "input": [" ".join(CHUNKS)]})
    assert got["usage"]["prompt_tokens"] == usage["usage"]["prompt_tokens"]


async def test_the_tiny_model_exactly_and_with_its_prompt(core, tiny_models):
    got = await core.embeddings.create({"model": "tiny", "input": CHUNKS, "late_chunking": True})
    np.testing.assert_allclose(matrix(got), jina_reference(tiny_models["embed"], CHUNKS),
                               atol=2e-5)
    got = await core.embeddings.create({"model": "tiny", "input": CHUNKS, "late_chunking": True,
                                        "input_type": "query"})
    # the prompt's tokens count to the first chunk, as [CLS] does
    np.testing.assert_allclose(matrix(got), jina_reference(tiny_models["embed"], CHUNKS,
                                                           prefix="query: "), atol=2e-5)


async def test_every_embed_route_takes_it(core, tiny_models):
    expected = jina_reference(tiny_models["embed"], CHUNKS)
    cohere = await core.cohere.v2({"model": "tiny", "texts": CHUNKS, "late_chunking": True,
                                   "input_type": "classification", "embedding_types": ["float"]})
    np.testing.assert_allclose(cohere["embeddings"]["float"], expected, atol=2e-5)
    tei = await core.tei.embed({"inputs": CHUNKS, "late_chunking": True}, model="tiny")
    np.testing.assert_allclose(np.array(tei), expected, atol=2e-5)
    job = await dispatch(core, {"model": "tiny", "input": CHUNKS, "late_chunking": True})
    np.testing.assert_allclose(matrix(job), expected, atol=2e-5)  # a RunPod job's input


async def test_a_document_past_the_window(core, tiny_models):
    """The tiny model's window is 128 tokens: truncate=NONE refuses a longer document naming the
    window; truncation (the default) reads it in consecutive windows, each chunk pooled over
    its own tokens, none lost."""
    chunks = [f"Paragraph {i} tells of harbours, lanterns and the tides of autumn." for i in range(24)]
    with pytest.raises(BadRequest, match="window of 128"):
        await core.embeddings.create({"model": "tiny", "input": chunks, "late_chunking": True,
                                      "truncate": "NONE"})
    got = matrix(await core.embeddings.create({"model": "tiny", "input": chunks,
                                               "late_chunking": True}))
    assert got.shape == (24, 32)
    np.testing.assert_allclose(got, jina_reference(tiny_models["embed"], chunks, window=128),
                               atol=2e-5)


async def test_what_cannot_be_late_chunked(core, tiny_models):
    with pytest.raises(BadRequest, match="pools by cls"):
        await core.embeddings.create({"model": "tiny-cls", "input": CHUNKS, "late_chunking": True})
    with pytest.raises(BadRequest, match="images and audio cannot be chunks"):
        await core.embeddings.create({"model": "tiny", "late_chunking": True,
                                      "input": [{"text": "a"}, {"image": "data:image/png;base64,AAAA"}]})
    card = core.models.card("tiny")
    assert "late_chunking" in card["capabilities"]
    assert "late_chunking" not in core.models.card("tiny-cls")["capabilities"]


async def test_on_torch(tiny_models, cls_model):
    """BACKEND=torch (infinity; what a GPU gets): its encoder's token states (compat's "token
    states"), the same chunk vectors, windows included; TEI's /embed_all from them too."""
    async with running(model_names=f"{tiny_models['embed']};{cls_model}",
                       served_model_names="tiny;tiny-cls", backend="torch",
                       prompts="query=query: ;") as core:
        assert core.engine.ready, core.engine.failure
        assert core.models.card("tiny")["backend"] == "torch"
        got = await core.embeddings.create({"model": "tiny", "input": CHUNKS, "late_chunking": True,
                                            "input_type": "query"})
        np.testing.assert_allclose(matrix(got), jina_reference(tiny_models["embed"], CHUNKS,
                                                               prefix="query: "), atol=2e-5)
        chunks = [f"Paragraph {i} tells of harbours and the tides of autumn." for i in range(24)]
        got = await core.embeddings.create({"model": "tiny", "input": chunks, "late_chunking": True})
        np.testing.assert_allclose(matrix(got), jina_reference(tiny_models["embed"], chunks,
                                                               window=128), atol=2e-5)
        with pytest.raises(BadRequest, match="window of 128"):
            await core.embeddings.create({"model": "tiny", "input": chunks, "late_chunking": True,
                                          "truncate": "NONE"})
        with pytest.raises(BadRequest, match="pools by cls"):
            await core.embeddings.create({"model": "tiny-cls", "input": CHUNKS,
                                          "late_chunking": True})
        states = await core.tei.embed_all({"inputs": CHUNKS[:2]}, model="tiny")
        expected = hidden_states(tiny_models["embed"], CHUNKS[:2])
        for row, rows in zip(states, expected):
            np.testing.assert_allclose(row, rows, atol=2e-5)


def test_owners_and_windows():
    # SentencePiece-like offsets: a word's span may start at the space before it
    text = "query: ab cd ef"
    chunks = ["ab", "cd ef"]
    offsets = [(0, 0), (0, 6), (6, 9), (9, 12), (12, 15), (0, 0)]
    special = [1, 0, 0, 0, 0, 1]
    assert owners(text, "query: ", chunks, offsets, special) == [0, 0, 0, 1, 1, 1]
    pieces, pooled = windows([1, 0, 0, 0, 0, 0, 1], 4)
    assert pieces == [[0, 1, 2, 6], [0, 3, 4, 6], [0, 5, 6]]
    assert pooled == [[True, True, True, False], [False, True, True, False],
                      [False, True, True]]
    assert windows([1, 0, 1], 8) == ([[0, 1, 2]], [[True, True, True]])
