"""Every dialect against one real `bentoml serve` process, through the official clients where
they exist (Cohere's SDK, huggingface_hub's InferenceClient, LlamaIndex's
TextEmbeddingsInference), unchanged but for the URL: the same texts give the same vectors
(and int8/binary bytes) as `/v1/embeddings`; classify equals transformers on a tiny generated
classifier; tokenize equals the model's tokenizer; mixed text+image items on the tiny CLIP equal
the two single-modality requests."""

from __future__ import annotations

import base64

import cohere
import httpx
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

from conftest import MINILM
from embedding_worker.config import bundled_model_path
from imagehost import image_bytes

pytestmark = pytest.mark.slow

TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force.",
         "A short one"]


@pytest.fixture(scope="module")
def models(dialect_models):
    return dialect_models


@pytest.fixture(scope="module")
def server(dialect_server):
    return dialect_server


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def openai_vectors(oai, model, texts, **extra):
    """Float vectors through the openai SDK (which asks for base64 and decodes float32)."""
    result = oai.embeddings.create(model=model, input=texts, extra_body=extra or None)
    return [item.embedding for item in result.data], result


def typed_vectors(server, model, texts, output_dtype):
    """int8/uint8/binary/ubinary vectors of /v1/embeddings (as JSON integers)."""
    body = {"model": model, "input": texts, "output_dtype": output_dtype}
    return [item["embedding"] for item in post(server, "/v1/embeddings", body).json()["data"]]


def post(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def data_uri(color: str) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes("PNG", color)).decode()


# --- Cohere -------------------------------------------------------------------------------------


def test_cohere_v2_embed_gives_every_type_as_v1_embeddings_does(server, oai):
    co = cohere.ClientV2(api_key="unused", base_url=server.url)
    types = ["float", "int8", "uint8", "binary", "ubinary"]
    result = co.embed(model=MINILM, texts=TEXTS, input_type="search_document",
                      embedding_types=types)
    floats, usage = openai_vectors(oai, MINILM, TEXTS)
    np.testing.assert_allclose(result.embeddings.float_, floats, rtol=0, atol=1e-6)
    for kind in types[1:]:
        assert getattr(result.embeddings, kind) == typed_vectors(server, MINILM, TEXTS, kind), kind
    assert result.texts == TEXTS
    assert result.meta.billed_units.input_tokens == usage.usage.prompt_tokens
    assert result.meta.api_version.version == "2"


def test_cohere_v2_output_dimension_and_base64(server, oai):
    co = cohere.ClientV2(api_key="unused", base_url=server.url)
    result = co.embed(model=MINILM, texts=TEXTS[:1], input_type="search_query",
                      embedding_types=["float", "base64"], output_dimension=64)
    expected, _ = openai_vectors(oai, MINILM, TEXTS[:1], dimensions=64)
    np.testing.assert_allclose(result.embeddings.float_, expected, rtol=0, atol=1e-6)
    decoded = np.frombuffer(base64.b64decode(result.embeddings.base64[0]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(result.embeddings.float_[0], dtype=np.float32))


def test_cohere_v1_embed_floats_and_by_type(server, oai):
    co = cohere.Client(api_key="unused", base_url=server.url)
    floats = co.embed(texts=TEXTS, model=MINILM, input_type="search_query")
    assert floats.response_type == "embeddings_floats"
    expected, _ = openai_vectors(oai, MINILM, TEXTS)
    np.testing.assert_allclose(floats.embeddings, expected, rtol=0, atol=1e-6)
    by_type = co.embed(texts=TEXTS, model=MINILM, input_type="search_query",
                       embedding_types=["int8"])
    assert by_type.response_type == "embeddings_by_type"
    assert by_type.embeddings.int8 == typed_vectors(server, MINILM, TEXTS, "int8")


def test_cohere_max_tokens_truncates_or_refuses(server, oai):
    text = "one two three four five six seven"
    body = {"model": MINILM, "texts": [text], "input_type": "search_query", "max_tokens": 5,
            "embedding_types": ["float"]}
    end = post(server, "/v2/embed", body).json()
    # 5 tokens with [CLS] and [SEP]: three words kept, from the start or (START) from the end
    np.testing.assert_allclose(end["embeddings"]["float"],
                               openai_vectors(oai, MINILM, ["one two three"])[0], atol=1e-6)
    start = post(server, "/v2/embed", {**body, "truncate": "START"}).json()
    np.testing.assert_allclose(start["embeddings"]["float"],
                               openai_vectors(oai, MINILM, ["five six seven"])[0], atol=1e-6)
    assert end["meta"]["warnings"] == [
        f"input_type 'search_query': model '{MINILM}' has no prompt for it; none applied"]
    refused = post(server, "/v2/embed", {**body, "truncate": "NONE"})
    assert refused.status_code == 400
    assert "texts[0]: it is 9 tokens, over max_tokens=5" in refused.json()["error"]["message"]


def test_cohere_v1_embed_without_a_model_takes_the_first_embedder(server, oai):
    result = post(server, "/v1/embed", {"texts": TEXTS[:1]}).json()
    np.testing.assert_allclose(result["embeddings"], openai_vectors(oai, MINILM, TEXTS[:1])[0],
                               rtol=0, atol=1e-6)


def test_cohere_images_and_inputs_on_the_clip(server, oai):
    co = cohere.ClientV2(api_key="unused", base_url=server.url)
    images = [data_uri("red"), data_uri("blue")]
    result = co.embed(model="tiny-clip", images=images, input_type="image",
                      embedding_types=["float"])
    expected, _ = openai_vectors(oai, "tiny-clip", images, modality="image")
    np.testing.assert_allclose(result.embeddings.float_, expected, rtol=0, atol=1e-6)
    assert result.meta.billed_units.images == 2
    # `inputs`: one part each, text and image in one request
    inputs = [{"content": [{"type": "text", "text": "a red square"}]},
              {"content": [{"type": "image_url", "image_url": {"url": images[0]}}]}]
    mixed = co.embed(model="tiny-clip", inputs=inputs, input_type="search_document",
                     embedding_types=["float"])
    text, _ = openai_vectors(oai, "tiny-clip", ["a red square"])
    np.testing.assert_allclose(mixed.embeddings.float_, [text[0], expected[0]], rtol=0, atol=1e-6)


def test_cohere_fusing_text_and_image_is_a_readable_400(server):
    co = cohere.ClientV2(api_key="unused", base_url=server.url)
    fused = [{"content": [{"type": "text", "text": "a red square"},
                          {"type": "image_url", "image_url": {"url": data_uri("red")}}]}]
    with pytest.raises(cohere.errors.BadRequestError) as raised:
        co.embed(model="tiny-clip", inputs=fused, input_type="search_document",
                 embedding_types=["float"])
    assert raised.value.status_code == 400
    assert "mixes text and image into one vector" in str(raised.value)
    empty = httpx.post(f"{server.url}/v1/embed", json={"model": "tiny-clip", "inputs": []})
    assert empty.status_code == 400 and "inputs: must not be empty" in empty.text  # (was a 500)
    with pytest.raises(cohere.errors.NotFoundError) as missing:
        co.embed(model="nope", texts=["x"], input_type="search_query", embedding_types=["float"])
    assert "model 'nope' is not served here" in str(missing.value)


def test_cohere_rerank_v2_and_v1_match_v1_rerank(server):
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "France borders Spain."]
    ours = post(server, "/v1/rerank", {"model": "tiny-rerank", "query": "France", "documents": docs,
                                       "return_documents": True}).json()
    v2 = cohere.ClientV2(api_key="unused", base_url=server.url).rerank(
        model="tiny-rerank", query="France", documents=docs, top_n=2)
    assert [(r.index, r.relevance_score) for r in v2.results] == \
        [(r["index"], r["relevance_score"]) for r in ours["results"][:2]]
    assert v2.meta.billed_units.search_units == 1
    v1 = cohere.Client(api_key="unused", base_url=server.url).rerank(
        model="tiny-rerank", query="France", documents=[{"text": d} for d in docs],
        return_documents=True)
    assert [(r.index, r.document.text) for r in v1.results] == \
        [(r["index"], r["document"]["text"]) for r in ours["results"]]


# --- text-embeddings-inference -------------------------------------------------------------------


@pytest.fixture
def hub_online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every URL, a local
    server's too; these tests reach only the local server."""
    import huggingface_hub.constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    yield
    monkeypatch.undo()
    reset_sessions()


def test_huggingface_hub_feature_extraction_at_the_root_and_per_model(server, oai, hub_online):
    expected, _ = openai_vectors(oai, MINILM, TEXTS[:1])
    root = InferenceClient(model=server.url).feature_extraction(TEXTS[0])
    np.testing.assert_allclose(root, expected, rtol=0, atol=1e-6)
    named = InferenceClient(model=f"{server.url}/tei/tiny-raw").feature_extraction(
        TEXTS[0], normalize=False)
    raw, _ = openai_vectors(oai, "tiny-raw", TEXTS[:1], normalized=False)
    np.testing.assert_allclose(named, raw, rtol=0, atol=1e-6)
    assert abs(np.linalg.norm(named[0]) - 1) > 0.01  # the model's own vector, not a unit one


def cosines(vectors):
    m = np.asarray(vectors, dtype=np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return m[1:] @ m[0]


def test_huggingface_hub_sentence_similarity_at_the_root_and_per_model(server, oai, hub_online):
    """The sentence-similarity task: cosines of the vectors /v1/embeddings gives (tiny-raw's are
    not unit length: the cosine is not their dot product)."""
    for base, model in ((server.url, MINILM), (f"{server.url}/tei/tiny-raw", "tiny-raw")):
        got = InferenceClient(model=base).sentence_similarity(TEXTS[0], TEXTS[1:])
        expected, _ = openai_vectors(oai, model, TEXTS, normalized=False)
        np.testing.assert_allclose(got, cosines(expected), rtol=0, atol=1e-5)
    job = post(server, "/runsync", {"input": {"route": "/similarity", "body": {
        "inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}}}}).json()
    minilm, _ = openai_vectors(oai, MINILM, TEXTS)
    np.testing.assert_allclose(job["output"], cosines(minilm), rtol=0, atol=1e-5)


def test_similarity_with_a_prompt_and_truncation(client):
    """Options as embeddings take them: the model's prompt, and Left truncation as START."""
    long = "tides rise and fall " * 200
    body = {"inputs": {"source_sentence": "a question", "sentences": [long, "x"]},
            "prompt_name": "query", "truncation_direction": "Left"}
    got = client.post("/similarity", json=body)
    assert got.status_code == 200, got.text
    vectors = client.post("/v1/embeddings", json={
        "model": MINILM, "input": ["a question", long, "x"], "prompt_name": "query",
        "truncate": "START"}).json()["data"]
    np.testing.assert_allclose(got.json(), cosines([v["embedding"] for v in vectors]), atol=1e-5)
    plain = client.post("/", json={**body, "prompt_name": None, "truncation_direction": None})
    assert not np.allclose(plain.json(), got.json(), atol=1e-3)  # both options changed the vectors
    refused = client.post("/similarity", json={**body, "truncate": False})
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("inputs.sentences[0]: it is ")  # over the window
    bad = client.post("/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["b", " "]}})
    assert bad.status_code == 400 and bad.json()["error"].startswith("inputs.sentences[1]: empty")


def test_llama_index_text_embeddings_inference(server, oai):
    embedder = TextEmbeddingsInference(model_name=MINILM, base_url=f"{server.url}/tei/{MINILM}")
    expected, _ = openai_vectors(oai, MINILM, TEXTS)
    np.testing.assert_allclose(embedder.get_text_embedding_batch(TEXTS), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(embedder.get_query_embedding(TEXTS[0]), expected[0], rtol=0, atol=1e-6)
    # at the root: the first model that embeds
    root = TextEmbeddingsInference(model_name=MINILM, base_url=server.url)
    np.testing.assert_allclose(root.get_text_embedding(TEXTS[1]), expected[1], rtol=0, atol=1e-6)


def test_huggingface_hub_text_classification_equals_transformers(server, models, hub_online):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    got = InferenceClient(model=f"{server.url}/tei/tiny-classify").text_classification(TEXTS[1])
    tokenizer = AutoTokenizer.from_pretrained(models["classify"])
    model = AutoModelForSequenceClassification.from_pretrained(models["classify"]).eval()
    with torch.no_grad():
        probs = model(**tokenizer(TEXTS[1], return_tensors="pt")).logits.softmax(-1)[0].numpy()
    expected = sorted(((model.config.id2label[i], float(p)) for i, p in enumerate(probs)),
                      key=lambda pair: -pair[1])
    assert [e.label for e in got] == [label for label, _ in expected]
    np.testing.assert_allclose([e.score for e in got], [p for _, p in expected], atol=1e-5)


def test_huggingface_hub_reads_tei_errors(server, hub_online):
    client = InferenceClient(model=f"{server.url}/tei/no-such-model")
    with pytest.raises(HfHubHTTPError) as raised:
        client.feature_extraction("x")
    assert raised.value.response.status_code == 404
    assert "model 'no-such-model' is not served here" in str(raised.value)
    with pytest.raises(HfHubHTTPError) as wrong_kind:
        InferenceClient(model=f"{server.url}/tei/tiny-rerank").feature_extraction("x")
    assert "reranks" in str(wrong_kind.value)


def test_tei_routes_in_tei_shapes(server, oai, models):
    embed = post(server, "/embed", {"inputs": TEXTS, "truncate": True, "truncation_direction": "Right"})
    np.testing.assert_allclose(embed.json(), openai_vectors(oai, MINILM, TEXTS)[0], rtol=0, atol=1e-6)
    single = post(server, f"/tei/{MINILM}/embed", {"inputs": TEXTS[0], "dimensions": 32}).json()
    np.testing.assert_allclose(single, openai_vectors(oai, MINILM, TEXTS[:1], dimensions=32)[0],
                               rtol=0, atol=1e-6)
    ours = post(server, "/v1/rerank", {"model": "tiny-rerank", "query": "q", "documents": TEXTS}).json()
    tei = post(server, "/rerank", {"query": "q", "texts": TEXTS, "return_text": True}).json()
    assert tei == [{"index": r["index"], "score": r["relevance_score"], "text": TEXTS[r["index"]]}
                   for r in ours["results"]]
    named = post(server, "/tei/tiny-rerank/rerank", {"query": "q", "texts": TEXTS}).json()
    assert [r["index"] for r in named] == [r["index"] for r in ours["results"]]
    predict = post(server, "/predict", {"inputs": [TEXTS[0]], "raw_scores": True}).json()
    classify = post(server, "/v1/classify", {"model": "tiny-classify", "input": [TEXTS[0]],
                                             "raw_scores": True}).json()
    assert predict == [[{"score": x["score"], "label": x["label"]} for x in classify["data"][0]]]
    info = httpx.get(f"{server.url}/tei/tiny-classify/info").json()
    assert info["model_type"] == {"classifier": {
        "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
        "label2id": {"negative": 0, "neutral": 1, "positive": 2}}}
    assert httpx.get(f"{server.url}/info").json()["model_type"] == {"embedding": {"pooling": "mean"}}
    assert httpx.get(f"{server.url}/health").status_code == 200
    too_long = post(server, "/embed", {"inputs": "word " * 400, "truncate": False})
    assert too_long.status_code == 400
    assert too_long.json()["error_type"] == "Validation"
    assert "over the model's window of 256 tokens" in too_long.json()["error"]


def test_tei_tokenize_and_decode_equal_the_tokenizer(server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    text = "Tokenizers split words, e.g. 'unbelievable'."
    encoded = tokenizer(text, return_offsets_mapping=True)
    tokens = post(server, "/tokenize", {"inputs": text}).json()[0]
    assert [t["id"] for t in tokens] == encoded["input_ids"]
    assert [t["special"] for t in tokens] == [True] + [False] * (len(tokens) - 2) + [True]
    assert [(t["start"], t["stop"]) for t in tokens[1:-1]] == \
        [tuple(span) for span in encoded["offset_mapping"][1:-1]]
    assert [t["text"] for t in tokens[1:-1]] == [text[a:b] for a, b in encoded["offset_mapping"][1:-1]]
    decoded = post(server, "/decode", {"ids": encoded["input_ids"]}).json()
    assert decoded == [tokenizer.decode(encoded["input_ids"], skip_special_tokens=True)]


# --- Jina ---------------------------------------------------------------------------------------


def test_jina_mixed_text_and_image_items_equal_single_modality_requests(server, oai):
    image = data_uri("green")
    mixed = post(server, "/v1/embeddings", {"model": "tiny-clip", "input": [
        {"text": "a green square"}, {"image": image}, "plain text"]}).json()
    texts, _ = openai_vectors(oai, "tiny-clip", ["a green square", "plain text"])
    images, _ = openai_vectors(oai, "tiny-clip", [image], modality="image")
    got = [item["embedding"] for item in mixed["data"]]
    np.testing.assert_allclose(got, [texts[0], images[0], texts[1]], rtol=0, atol=1e-6)


def test_jina_fields(server, oai):
    raw = post(server, "/v1/embeddings", {"model": "tiny-raw", "input": TEXTS, "normalized": False,
                                          "task": "retrieval.passage"}).json()
    unit, _ = openai_vectors(oai, "tiny-raw", TEXTS)
    for r, u in zip(raw["data"], unit):
        v = np.asarray(r["embedding"])
        np.testing.assert_allclose(v / np.linalg.norm(v), u, atol=1e-5)
    chunks = ["The harbour froze that winter.", "Its boats stayed in until March."]
    late = post(server, "/v1/embeddings", {"model": MINILM, "input": chunks, "late_chunking": True})
    plain = post(server, "/v1/embeddings", {"model": MINILM, "input": chunks}).json()
    vectors = [np.asarray(d["embedding"]) for d in late.json()["data"]]
    assert late.status_code == 200 and len(vectors) == 2  # each chunk read in the other's context
    assert all(v @ np.asarray(p["embedding"]) < 0.99 for v, p in zip(vectors, plain["data"]))
    clip = post(server, "/v1/embeddings", {"model": "tiny-clip", "input": chunks, "late_chunking": True})
    assert clip.status_code == 400 and "late_chunking" in clip.json()["error"]["message"]
    quantised = post(server, "/v1/embeddings", {"model": "tiny-raw", "input": "x",
                                                "normalized": False, "embedding_type": "int8"})
    assert quantised.status_code == 400 and "unit vectors" in quantised.json()["error"]["message"]
    docs = post(server, "/v1/rerank", {"model": "tiny-rerank", "query": "q",
                                       "documents": [{"text": t} for t in TEXTS]}).json()
    plain = post(server, "/v1/rerank", {"model": "tiny-rerank", "query": "q", "documents": TEXTS}).json()
    assert [r["relevance_score"] for r in docs["results"]] == \
        [r["relevance_score"] for r in plain["results"]]


# --- classify and tokenize ----------------------------------------------------------------------


def test_classify_equals_transformers_and_runs_in_a_job(server, models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["classify"])
    model = AutoModelForSequenceClassification.from_pretrained(models["classify"]).eval()
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    labels = [model.config.id2label[i] for i in range(3)]
    body = {"model": "tiny-classify", "input": TEXTS}
    probs = post(server, "/v1/classify", body).json()
    raw = post(server, "/v1/classify", {**body, "raw_scores": True, "top_k": 2}).json()
    for i, row in enumerate(logits):
        softmax = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        got = {x["label"]: x["score"] for x in probs["data"][i]}
        np.testing.assert_allclose([got[label] for label in labels], softmax, atol=1e-5)
        best = np.argsort(-row)[:2]
        assert [x["label"] for x in raw["data"][i]] == [labels[j] for j in best]
        np.testing.assert_allclose([x["score"] for x in raw["data"][i]], row[best], atol=1e-5)
    assert probs["usage"]["prompt_tokens"] > 0
    job = post(server, "/runsync", {"input": {"route": "/v1/classify", "body": body}}).json()
    assert job["status"] == "COMPLETED" and job["output"]["data"] == probs["data"]


def test_a_classifier_fault_fails_only_its_request(server):
    long = post(server, "/v1/classify", {"model": "tiny-classify-faulty", "input": ["word " * 40]})
    assert long.status_code == 500 and long.json()["error"]["code"] == "model_error"
    short = post(server, "/v1/classify", {"model": "tiny-classify-faulty", "input": ["fine"]})
    assert short.status_code == 200


def test_tokenize_counts_the_prompt(client):
    result = client.post("/v1/tokenize", json={"model": MINILM, "input": "hello",
                                               "prompt_name": "query"}).json()
    assert result["prompt_name"] == "query"
    item = result["data"][0]
    assert item["tokens"] == ["[CLS]", "query", ":", "hello", "[SEP]"] and item["count"] == 5
    assert item["offsets"] == [None, None, None, [0, 5], None]  # into the text as sent


def test_tokenize_equals_the_tokenizer_with_the_window(server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    result = post(server, "/v1/tokenize", {"model": MINILM, "input": TEXTS}).json()
    assert result["window"] == 256
    for item, text in zip(result["data"], TEXTS):
        encoded = tokenizer(text, return_offsets_mapping=True)
        assert item["ids"] == encoded["input_ids"]
        assert item["tokens"] == tokenizer.convert_ids_to_tokens(encoded["input_ids"])
        assert item["count"] == len(encoded["input_ids"])
        assert item["offsets"][1:-1] == [list(span) for span in encoded["offset_mapping"][1:-1]]
        assert item["offsets"][0] is None and item["offsets"][-1] is None
    bare = post(server, "/v1/tokenize", {"model": MINILM, "input": "hi", "add_special_tokens": False})
    assert bare.json()["data"][0]["ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_every_dialect_route_is_reachable_in_a_job(server, oai):
    expected, _ = openai_vectors(oai, MINILM, TEXTS[:1])
    for route, body, pick in [
        ("/v2/embed", {"model": MINILM, "texts": TEXTS[:1], "input_type": "search_query"},
         lambda out: out["embeddings"]["float"]),
        ("/embed", {"inputs": TEXTS[0]}, lambda out: out),
        (f"/tei/{MINILM}/embed", {"inputs": TEXTS[0]}, lambda out: out),
    ]:
        job = post(server, "/runsync", {"input": {"route": route, "body": body}}).json()
        assert job["status"] == "COMPLETED", job
        np.testing.assert_allclose(pick(job["output"]), expected, rtol=0, atol=1e-6)
    unknown = post(server, "/runsync", {"input": {"route": "/v9/nope", "body": {}}}).json()
    assert unknown["status"] == "FAILED" and "route '/v9/nope' is not served" in unknown["error"]
