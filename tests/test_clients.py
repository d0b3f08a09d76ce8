"""Third-party clients against the one real `bentoml serve` process of the dialect suites
(conftest's `dialect_server`), each pointed at it only through its documented base-URL setting,
nothing else changed: LiteLLM (its openai/, cohere/ and infinity/ providers), LangChain (OpenAI,
Cohere and Infinity embeddings; Cohere rerank), LlamaIndex (the OpenAI-like embedding; the Cohere
and Jina rerank postprocessors), Chroma's embedding functions in an in-process database, and the
Vercel AI SDK under Node (tests/js).

Every vector a client hands back is held to what the server's own `POST /v1/embeddings` returns for
the same texts, every rerank score to `POST /v1/rerank`'s (index and relevance_score, in order).

No client may reach another host: while this module imports and runs, a connection or DNS lookup
for anything but the loopback is refused at once (as on a machine without a network) and recorded,
and a test during which one was attempted fails. LiteLLM's cost-map download and the rest of what
it fetches on its own are switched off its documented way (below, before it is imported); Chroma's
anonymized telemetry is switched off in its Settings; LangSmith tracing is off."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import DIALECT_SERVED, MINILM
from server import ROOT

pytestmark = pytest.mark.slow

# --- no host but this machine -------------------------------------------------------------------


class _Outbound:
    """An audit hook (process-wide, so it sees every thread and event loop): while `on`, a
    connection or getaddrinfo for a host that is not loopback raises ENETUNREACH and is recorded."""

    def __init__(self):
        self.on = False
        self.attempts: list[str] = []

    @staticmethod
    def local(host) -> bool:
        if host is None:
            return True  # getaddrinfo(None, port): a local bind
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        host = str(host).strip("[]").split("%")[0]
        if host.lower() in ("localhost", ""):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False  # a name other than localhost
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return ip.is_loopback or ip.is_unspecified

    def __call__(self, event: str, args: tuple) -> None:
        if not self.on:
            return
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event == "socket.connect":
            address = args[1]
            if not isinstance(address, tuple):
                return  # a Unix socket
            host = address[0]
        else:
            return
        if self.local(host):
            return
        self.attempts.append(f"{event} {host!r}")
        raise OSError(errno.ENETUNREACH, f"test_clients: no host but the loopback ({host!r})")


OUTBOUND = _Outbound()
sys.addaudithook(OUTBOUND)

# LiteLLM: the bundled model cost map instead of downloading it at import (its documented switch;
# without it `import litellm` asks raw.githubusercontent.com, retrying), and its offline mode (no
# catalog, check or tokenizer fetched on its own). Both before the import. The releases pinned have
# no usage telemetry to switch off (no `litellm.telemetry`).
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_OFFLINE_MODE"] = "true"
# LangChain: no tracing to LangSmith, whatever the caller's environment says.
for _name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
    os.environ[_name] = "false"
# Chroma: anonymized telemetry off (also passed in each client's Settings below).
os.environ["ANONYMIZED_TELEMETRY"] = "False"

OUTBOUND.on = True
try:
    import chromadb
    import litellm
    from chromadb.config import Settings as ChromaSettings
    from chromadb.utils.embedding_functions import (
        HuggingFaceEmbeddingServer,
        OpenAIEmbeddingFunction,
    )
    from langchain_cohere import CohereEmbeddings
    from langchain_cohere import CohereRerank as LangChainCohereRerank
    from langchain_community.embeddings import InfinityEmbeddings
    from langchain_core.documents import Document
    from langchain_openai import OpenAIEmbeddings
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding
    from llama_index.postprocessor.cohere_rerank import CohereRerank as LlamaIndexCohereRerank
    from llama_index.postprocessor.jinaai_rerank import JinaRerank
finally:
    OUTBOUND.on = False
IMPORT_ATTEMPTS = list(OUTBOUND.attempts)

JS = ROOT / "tests" / "js"
TEXTS = ["The cat sat on the mat.",
         "Quantum chromodynamics describes the strong force between quarks and gluons.",
         "A short one",
         "Tides are driven mostly by the Moon's gravity, and a little by the Sun's."]
QUERY = "Which product has warranty coverage?"
DOCS = ["Product A comes with a 2-year warranty",
        "Product B is available in red and blue colors",
        "All electronics include a standard 1-year warranty",
        "Shipping is free for orders over $50",
        "Warranty claims require the original receipt"]
RERANK = "tiny-rerank"
ATOL = 1e-5  # vectors: float32 on the wire for some clients (base64)
# scores: JSON doubles passed through; the tiny reranker's scores lie ~1e-5 apart, so a tolerance
# this tight is what makes a score given to the wrong document fail
SCORE_ATOL = 1e-7


@pytest.fixture(scope="module")
def server(dialect_server):
    """The one real server the dialect suites use too (conftest): the bundled MiniLM and the tiny
    reranker among its models, no prompts."""
    assert MINILM in DIALECT_SERVED and RERANK in DIALECT_SERVED
    return dialect_server


@pytest.fixture(autouse=True)
def no_other_host():
    """Every test runs as on a machine without a network; one that tried to reach out fails."""
    before = len(OUTBOUND.attempts)
    OUTBOUND.on = True
    try:
        yield
    finally:
        OUTBOUND.on = False
    attempts = OUTBOUND.attempts[before:]
    assert not attempts, f"a client tried to reach another host: {attempts}"


def test_importing_the_clients_reached_no_other_host():
    assert IMPORT_ATTEMPTS == []


def test_the_guard_refuses_other_hosts_and_lets_the_loopback_through():
    """Through the installed hook (sys.audit raises the events a socket would; none is opened)."""
    before = len(OUTBOUND.attempts)
    for event, args in [("socket.connect", (None, ("192.0.2.1", 443))),
                        ("socket.connect", (None, ("2001:db8::1", 443, 0, 0))),
                        ("socket.getaddrinfo", ("example.com", 443, 0, 0, 0))]:
        with pytest.raises(OSError) as refused:
            sys.audit(event, *args)
        assert refused.value.errno == errno.ENETUNREACH
    for event, args in [("socket.connect", (None, ("127.0.0.1", 3000))),
                        ("socket.connect", (None, ("::1", 3000, 0, 0))),
                        ("socket.connect", (None, "/tmp/unix.sock")),
                        ("socket.getaddrinfo", ("localhost", 3000, 0, 0, 0))]:
        sys.audit(event, *args)
    assert len(OUTBOUND.attempts) == before + 3
    del OUTBOUND.attempts[before:]  # not the clients'


# --- what the server itself says ----------------------------------------------------------------


def reference(server, texts=TEXTS) -> tuple[np.ndarray, dict]:
    """The float vectors and usage of `POST /v1/embeddings` for `texts`."""
    response = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                          json={"model": MINILM, "input": texts, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["index"] for item in body["data"]] == list(range(len(texts)))
    return np.array([item["embedding"] for item in body["data"]]), body["usage"]


def reference_ranking(server, top_n=None, query=QUERY, docs=DOCS) -> list[tuple[int, float]]:
    """(index, relevance_score) of `POST /v1/rerank`, best first."""
    body = {"model": RERANK, "query": query, "documents": docs}
    if top_n is not None:
        body["top_n"] = top_n
    response = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    ranking = [(r["index"], r["relevance_score"]) for r in response.json()["results"]]
    assert len(ranking) == (top_n or len(docs))
    return ranking


def assert_vectors(got, expected):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def assert_ranking(got: list[tuple[int, float]], expected: list[tuple[int, float]]):
    assert [index for index, _ in got] == [index for index, _ in expected]
    np.testing.assert_allclose([score for _, score in got], [score for _, score in expected],
                               rtol=0, atol=SCORE_ATOL)


def test_the_reference_tells_texts_and_documents_apart(server):
    """The comparisons below can fail: the texts give distinct vectors, the documents distinct
    scores (so the order is well defined)."""
    vectors, usage = reference(server)
    assert usage["prompt_tokens"] > 0
    assert min(np.linalg.norm(a - b) for i, a in enumerate(vectors) for b in vectors[i + 1:]) > 0.1
    scores = sorted(score for _, score in reference_ranking(server))
    assert min(b - a for a, b in zip(scores, scores[1:])) > 10 * SCORE_ATOL


# --- LiteLLM ------------------------------------------------------------------------------------


def test_litellm_openai_provider_embedding(server):
    result = litellm.embedding(model=f"openai/{MINILM}", input=TEXTS,
                               api_base=f"{server.url}/v1", api_key="unused")
    expected, usage = reference(server)
    assert [item["index"] for item in result.data] == list(range(len(TEXTS)))
    assert_vectors([item["embedding"] for item in result.data], expected)
    assert result.usage.prompt_tokens == usage["prompt_tokens"]


def test_litellm_infinity_provider_embedding(server):
    result = litellm.embedding(model=f"infinity/{MINILM}", input=TEXTS, api_base=server.url,
                               api_key="unused")
    expected, usage = reference(server)
    assert_vectors([item["embedding"] for item in sorted(result.data, key=lambda d: d["index"])],
                   expected)
    assert result.usage.prompt_tokens == usage["prompt_tokens"]


@pytest.mark.parametrize("provider", ["cohere", "infinity"])
def test_litellm_rerank(server, provider):
    """Cohere's results carry `{"text": ...}` (/v1/rerank), Infinity's the text itself (/rerank);
    LiteLLM gives `{"text": ...}` for both."""
    result = litellm.rerank(model=f"{provider}/{RERANK}", query=QUERY, documents=DOCS, top_n=3,
                            return_documents=True, api_base=server.url, api_key="unused")
    expected = reference_ranking(server, top_n=3)
    assert_ranking([(r["index"], r["relevance_score"]) for r in result.results], expected)
    assert [r["document"]["text"] for r in result.results] == [DOCS[i] for i, _ in expected]


# --- LangChain ----------------------------------------------------------------------------------


def test_langchain_openai_embeddings(server):
    embedder = OpenAIEmbeddings(model=MINILM, base_url=f"{server.url}/v1", api_key="unused",
                                check_embedding_ctx_length=False, max_retries=0)
    expected, _ = reference(server)
    assert_vectors(embedder.embed_documents(TEXTS), expected)
    assert_vectors(embedder.embed_query(TEXTS[1]), expected[1])


def test_langchain_cohere_embeddings(server):
    embedder = CohereEmbeddings(model=MINILM, base_url=server.url, cohere_api_key="unused",
                                max_retries=0)
    expected, _ = reference(server)
    # search_document / search_query: MiniLM has no prompt for them here, so the plain vectors
    assert_vectors(embedder.embed_documents(TEXTS), expected)
    assert_vectors(embedder.embed_query(TEXTS[2]), expected[2])


def test_langchain_cohere_rerank_and_compressor(server):
    reranker = LangChainCohereRerank(model=RERANK, base_url=server.url, cohere_api_key="unused",
                                     top_n=3)
    expected = reference_ranking(server, top_n=3)
    got = reranker.rerank(DOCS, QUERY)
    assert_ranking([(r["index"], r["relevance_score"]) for r in got], expected)
    compressed = reranker.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    assert [d.page_content for d in compressed] == [DOCS[i] for i, _ in expected]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in compressed],
                               [score for _, score in expected], rtol=0, atol=SCORE_ATOL)


def test_langchain_community_infinity_embeddings(server):
    # Infinity's documented URL is the server root (http://localhost:7997); it posts /embeddings
    embedder = InfinityEmbeddings(model=MINILM, infinity_api_url=server.url)
    expected, _ = reference(server)
    # it sorts the texts by length before sending and puts the vectors back in order
    assert_vectors(embedder.embed_documents(TEXTS), expected)
    assert_vectors(embedder.embed_query(TEXTS[3]), expected[3])
    assert_vectors(asyncio.run(embedder.aembed_documents(TEXTS)), expected)


# --- LlamaIndex ---------------------------------------------------------------------------------


def nodes(docs=DOCS) -> list[NodeWithScore]:
    return [NodeWithScore(node=TextNode(text=d, id_=f"doc-{i}")) for i, d in enumerate(docs)]


def test_llama_index_openai_like_embedding(server):
    # embed_batch_size=3: four texts go in two requests
    embedder = OpenAILikeEmbedding(model_name=MINILM, api_base=f"{server.url}/v1",
                                   api_key="unused", embed_batch_size=3, max_retries=0)
    expected, _ = reference(server)
    assert_vectors(embedder.get_text_embedding_batch(TEXTS), expected)
    assert_vectors(embedder.get_query_embedding(TEXTS[0]), expected[0])
    assert_vectors(asyncio.run(embedder.aget_text_embedding_batch(TEXTS)), expected)


@pytest.mark.parametrize("make", [
    pytest.param(lambda url: LlamaIndexCohereRerank(model=RERANK, base_url=url, api_key="unused",
                                                    top_n=3, max_retries=1), id="cohere"),
    pytest.param(lambda url: JinaRerank(model=RERANK, base_url=f"{url}/v1", api_key="unused",
                                        top_n=3), id="jina"),
])
def test_llama_index_rerank_postprocessors(server, make):
    reranked = make(server.url).postprocess_nodes(nodes(), query_str=QUERY)
    expected = reference_ranking(server, top_n=3)
    assert_ranking([(int(n.node.id_.split("-")[1]), n.score) for n in reranked], expected)
    assert [n.node.get_content() for n in reranked] == [DOCS[i] for i, _ in expected]


# --- Chroma -------------------------------------------------------------------------------------


@pytest.fixture
def chroma(tmp_path):
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    yield client
    client.clear_system_cache()


def test_chroma_openai_embedding_function_stores_and_queries_our_vectors(server, chroma,
                                                                          monkeypatch):
    monkeypatch.setenv("CHROMA_OPENAI_API_KEY", "unused")  # its documented way to pass a key
    function = OpenAIEmbeddingFunction(model_name=MINILM, api_base=f"{server.url}/v1")
    collection = chroma.create_collection("texts", embedding_function=function,
                                          configuration={"hnsw": {"space": "cosine"}})
    ids = [f"t{i}" for i in range(len(TEXTS))]
    collection.add(ids=ids, documents=TEXTS)
    stored = collection.get(ids=ids, include=["embeddings", "documents"])
    expected, _ = reference(server)
    order = [ids.index(i) for i in stored["ids"]]
    assert stored["documents"] == [TEXTS[i] for i in order]
    assert_vectors(stored["embeddings"], expected[order])

    query = "What pulls the sea up and down twice a day?"
    found = collection.query(query_texts=[query], n_results=2, include=["distances"])
    q, _ = reference(server, [query])
    distances = 1 - expected @ q[0] / (np.linalg.norm(expected, axis=1) * np.linalg.norm(q[0]))
    nearest = np.argsort(distances)[:2]
    assert found["ids"][0] == [ids[i] for i in nearest]
    np.testing.assert_allclose(found["distances"][0], distances[nearest], rtol=0, atol=1e-4)


def test_chroma_huggingface_embedding_server_function(server, chroma):
    # TEI's /embed at the server root
    function = HuggingFaceEmbeddingServer(url=f"{server.url}/embed")
    collection = chroma.create_collection("tei", embedding_function=function)
    collection.add(ids=["a", "b", "c", "d"], documents=TEXTS)
    stored = collection.get(ids=["a", "b", "c", "d"], include=["embeddings"])
    expected, _ = reference(server)
    assert_vectors(stored["embeddings"], expected[["abcd".index(i) for i in stored["ids"]]])


# --- the Vercel AI SDK (Node) -------------------------------------------------------------------


@pytest.fixture(scope="session")
def node():
    """`node`, with tests/js's packages installed by `npm ci` from the committed lock (skipped
    when node_modules was installed from this very lock already)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm not found on PATH: tests/js needs Node 20+ with npm")
    lock = (JS / "package-lock.json").read_bytes()
    stamp = JS / "node_modules" / ".package-lock.sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if not (stamp.is_file() and stamp.read_text() == digest):
        done = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                              cwd=JS, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
        stamp.write_text(digest)
    return node


def test_vercel_ai_sdk_embed_many_and_rerank(server, node):
    spec = {"model": MINILM, "rerankModel": RERANK, "texts": TEXTS, "query": QUERY,
            "documents": DOCS}
    done = subprocess.run([node, str(JS / "ai_sdk.mjs"), server.url, json.dumps(spec)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected, usage = reference(server)
    # @ai-sdk/openai-compatible at /v1: /v1/embeddings
    assert_vectors(result["openaiCompatible"]["embeddings"], expected)
    assert result["openaiCompatible"]["usage"]["tokens"] == usage["prompt_tokens"]
    # @ai-sdk/cohere at /v2: /v2/embed (input_type search_query: no prompt for it here)
    assert_vectors(result["cohereEmbed"]["embeddings"], expected)
    # @ai-sdk/cohere's reranking model: /v2/rerank, every document
    assert_ranking([(r["originalIndex"], r["score"]) for r in result["cohereRerank"]["ranking"]],
                   reference_ranking(server))
