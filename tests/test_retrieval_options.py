"""Retrieval options (core/options.py, core/encoding.py): prompts from the model's config and from
PROMPTS, compact output types, truncation per request; held to sentence-transformers, numpy and
the tokenizer's own truncation."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import MINILM, running
from embedding_worker.config import bundled_model_path
from embedding_worker.core.errors import BadRequest
from models import make_tiny_embedder

PROMPTS = {"query": "query: ", "document": "passage: ", "classification": "Classify this: "}
TEXTS = ["how do tides work", "The moon's gravity pulls the oceans into two bulges.", "tides"]
# each is one token in MiniLM's vocabulary, so a cut between words is a cut between tokens
WORDS = ("one two three four five six seven eight nine ten red blue green black white "
         "house river tree stone cloud").split()


def cosines(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def vectors(result):
    return np.array([d["embedding"] for d in result["data"]], dtype=np.float64)


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    return make_tiny_embedder(tmp_path_factory.mktemp("prompted") / "m", prompts=PROMPTS,
                              default_prompt_name="document", window=16)


@pytest.fixture(scope="module")
def st(prompted):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(prompted), device="cpu")


@pytest.fixture(scope="module", params=["torch", "optimum"])
async def core(request, prompted):
    async with running(backend=request.param, model_names=f"{prompted};{bundled_model_path()}",
                       served_model_names=f"prompted;{MINILM}",
                       prompts=";query=query: |document=passage: ") as core:
        assert core.engine.ready, core.engine.failure
        yield core


async def embed(core, **body):
    return await core.embeddings.create({"model": "prompted", "input": TEXTS, **body})


@pytest.mark.parametrize("option, prompt", [
    ({"prompt_name": "query"}, "query"), ({"prompt_name": "classification"}, "classification"),
    ({"input_type": "search_query"}, "query"), ({"input_type": "query"}, "query"),
    ({"input_type": "search_document"}, "document"), ({"input_type": "classification"}, "classification"),
    ({"task": "retrieval.query"}, "query"), ({"task": "retrieval.passage"}, "document"),
    ({}, "document"),  # the model's default_prompt_name, as sentence-transformers applies it
])
async def test_each_way_of_naming_a_prompt_matches_sentence_transformers(core, st, option, prompt):
    result = await embed(core, **option)
    expected = st.encode(TEXTS, prompt_name=prompt)
    assert cosines(vectors(result), expected).min() >= 0.9999
    assert result["prompt_name"] == prompt and "warnings" not in result
    counted = sum(min(14, len(st.tokenizer(PROMPTS[prompt] + t, add_special_tokens=False)["input_ids"]))
                  for t in TEXTS)  # what the model saw: its window of 16 less [CLS] and [SEP]
    assert result["usage"]["prompt_tokens"] == counted


async def test_a_type_the_model_has_no_prompt_for_applies_none_and_says_so(core, st):
    result = await embed(core, input_type="clustering")
    assert cosines(vectors(result), st.encode(TEXTS, prompt="")).min() >= 0.9999
    assert "prompt_name" not in result
    assert result["warnings"] == ["input_type 'clustering': model 'prompted' has no prompt for it; "
                                  "none applied"]


async def test_bad_prompt_options_are_400s_naming_the_field(core):
    with pytest.raises(BadRequest, match="prompt_name: 'passage' is not a prompt of model "
                                         "'prompted'; its prompts: 'query', 'document', 'classification'"):
        await embed(core, prompt_name="passage")
    with pytest.raises(BadRequest, match="prompt_name and input_type: give one of them"):
        await embed(core, prompt_name="query", input_type="search_query")
    with pytest.raises(BadRequest, match="input_type: 'search' is not supported; expected one of "
                                         "search_query, search_document"):
        await embed(core, input_type="search")
    with pytest.raises(BadRequest, match="task: 'retrieval' is not supported"):
        await embed(core, task="retrieval")


async def test_prompts_setting_gives_the_bundled_model_prompts(core):
    from sentence_transformers import SentenceTransformer

    minilm = SentenceTransformer(bundled_model_path(), device="cpu")
    result = await core.embeddings.create({"model": MINILM, "input": TEXTS, "input_type": "search_query"})
    assert cosines(vectors(result), minilm.encode(TEXTS, prompt="query: ")).min() >= 0.9999
    card = core.models.card(MINILM)
    assert card["prompts"] == {"query": "query: ", "document": "passage: "}
    assert card["default_prompt_name"] is None and card["window"] == 256 and card["dimensions"] == 384
    plain = await core.embeddings.create({"model": MINILM, "input": TEXTS})  # no default prompt
    assert cosines(vectors(plain), minilm.encode(TEXTS)).min() >= 0.9999


async def test_models_list_shows_prompts_window_and_dimensions(core):
    card = core.models.card("prompted")
    assert card["prompts"] == PROMPTS and card["default_prompt_name"] == "document"
    assert card["window"] == 16 and card["dimensions"] == 32


# --- output types ---

def quantized(floats, output_dtype):
    """The documented definitions, computed here from the float output."""
    from sentence_transformers.quantization import quantize_embeddings

    if output_dtype in ("binary", "ubinary"):
        ours = np.packbits(floats > 0, axis=1)
        if output_dtype == "binary":
            ours = (ours.astype(np.int16) - 128).astype(np.int8)
        np.testing.assert_array_equal(ours, quantize_embeddings(floats, precision=output_dtype))
        return ours
    signed = np.clip(np.rint(floats * 127 * np.sqrt(floats.shape[1]) / 4), -128, 127)
    return signed.astype(np.int8) if output_dtype == "int8" else (signed + 128).astype(np.uint8)


@pytest.mark.parametrize("dimensions", [None, 64, 128])
@pytest.mark.parametrize("output_dtype", ["int8", "uint8", "binary", "ubinary"])
async def test_output_types_match_numpy_on_the_same_requests_floats(core, dimensions, output_dtype):
    body = {"model": MINILM, "input": TEXTS, "dimensions": dimensions}
    floats = vectors(await core.embeddings.create(body)).astype(np.float32)
    result = await core.embeddings.create({**body, "output_dtype": output_dtype})
    expected = quantized(floats, output_dtype)
    got = np.array([d["embedding"] for d in result["data"]])
    np.testing.assert_array_equal(got, expected)
    raw = await core.embeddings.create({**body, "embedding_type": output_dtype,
                                        "encoding_format": "base64"})
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=expected.dtype)
                        for d in raw["data"]])
    np.testing.assert_array_equal(decoded, expected)


async def test_the_same_text_gives_the_same_bytes_alone_and_in_a_mixed_batch(core):
    """The rule depends on nothing but the vector. ONNX Runtime computes a text's floats bit for
    bit the same in any batch, so the bytes are identical; torch's floats move by ~1e-7 with the
    batch around them, so an int8 component near a rounding boundary may move by one (1 of 98,304
    components in docs/retrieval.md's measurement), while signs (binary) hold."""
    batch = [("a short query %d" % i) if i % 2 else " ".join(WORDS[i % 7:]) * (1 + i % 9)
             for i in range(64)]  # short and long texts, so the batch pads and groups
    for output_dtype in ("int8", "binary"):
        body = {"model": MINILM, "output_dtype": output_dtype}
        alone = await core.embeddings.create({**body, "input": [batch[17]]})
        inside = await core.embeddings.create({**body, "input": batch})
        a = np.array(alone["data"][0]["embedding"], dtype=np.int16)
        b = np.array(inside["data"][17]["embedding"], dtype=np.int16)
        if core.models.card(MINILM)["backend"] == "optimum" or output_dtype == "binary":
            np.testing.assert_array_equal(a, b)
        else:
            assert np.abs(a - b).max() <= 1


async def test_binary_needs_a_multiple_of_8_dimensions(core):
    with pytest.raises(BadRequest, match="output_dtype: binary packs 8 dimensions per byte, and "
                                         "60 is not a multiple of 8"):
        await core.embeddings.create({"model": MINILM, "input": "x", "dimensions": 60,
                                      "output_dtype": "binary"})
    with pytest.raises(BadRequest, match="output_dtype: 'int4' is not supported; expected one of "
                                         "float, int8, uint8, binary, ubinary"):
        await core.embeddings.create({"model": MINILM, "input": "x", "output_dtype": "int4"})


# --- truncation per request ---

async def test_truncate_end_start_and_none_against_the_tokenizer(core, st):
    text = " ".join(WORDS)  # 20 one-token words; the window holds 14 besides [CLS] and [SEP]
    ids = st.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(WORDS)
    body = {"model": "prompted", "input": [text, "short text"], "prompt_name": "query"}
    end = await core.embeddings.create({**body, "truncate": "END"})
    default = await core.embeddings.create(body)
    kept = 16 - 2 - len(st.tokenizer(PROMPTS["query"], add_special_tokens=False)["input_ids"])
    start = await core.embeddings.create({**body, "truncate": "start"})
    st.tokenizer.truncation_side = "left"
    try:  # the tokenizer's own left truncation of the text, the prompt kept before it
        left = st.tokenizer.decode(st.tokenizer(text, add_special_tokens=False, truncation=True,
                                                max_length=kept)["input_ids"])
    finally:
        st.tokenizer.truncation_side = "right"
    assert left == " ".join(WORDS[-kept:])
    expected_end = st.encode([text, "short text"], prompt_name="query")
    expected_start = st.encode([left, "short text"], prompt_name="query")
    assert cosines(vectors(end), expected_end).min() >= 0.9999
    assert cosines(vectors(default), expected_end).min() >= 0.9999
    assert cosines(vectors(start), expected_start).min() >= 0.9999
    assert cosines(vectors(start)[:1], expected_end[:1]).max() < 0.9999  # not the same cut
    assert start["usage"] == end["usage"]  # the model saw as many tokens either way
    with pytest.raises(BadRequest, match=r"input\[0\]: it is \d+ tokens, over the model's window "
                                         r"of 16 tokens") as err:
        await core.embeddings.create({**body, "truncate": "NONE"})
    assert err.value.code == "context_length_exceeded"
