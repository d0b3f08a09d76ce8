"""The pages for people (api/pages.py): /docs and the playground at /, driven in headless Chromium
(Debian's `chromium`, through Playwright) against a real server with every request off the
server refused, so the pages work with no network; what the page shows equals the API's answers.

Screenshots of each view go to $SCREENSHOTS (else a temporary directory). README shows the ones in
docs/images; `page.sha256` there is the hash of the page's files they were taken of, so a change
to the page fails `test_the_screenshots_are_of_this_page` until they are taken again:
    SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/test_pages.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import MINILM
from embedding_worker.api import pages

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
KEY = "sesame-in-the-browser"
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.",
         "The girl is carrying a baby.", "A man is riding a horse."]


def page_digest() -> str:
    digest = hashlib.sha256(pages.DOCS.encode())
    for name in ("index.html", *pages.PLAYGROUND_FILES):
        digest.update((pages.PAGE / name).read_bytes())
    return digest.hexdigest()


def test_the_screenshots_are_of_this_page():
    assert (IMAGES / "page.sha256").read_text().strip() == page_digest(), (
        "the page changed since its screenshots in docs/images: take them again with "
        "SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/test_pages.py, and commit them")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = Path(os.environ.get("SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    where.mkdir(parents=True, exist_ok=True)
    yield where
    if where.resolve() == IMAGES.resolve():
        (IMAGES / "page.sha256").write_text(page_digest() + "\n")


@pytest.fixture(scope="module")
def browser():
    executable = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                      "google-chrome"))), None)
    if executable is None:
        message = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("REQUIRE_BROWSER"):  # CI installs it: there, its absence is a failure
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root (CI, containers)
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def m3_server(tmp_path_factory):
    """A tiny BGE-M3 (dense, sparse and multi-vector outputs) and a tiny CLAP (audio) behind
    API_KEY, their pages public."""
    from models import make_tiny_clap_audio, make_tiny_m3
    from server import BentoServer

    path = make_tiny_m3(tmp_path_factory.mktemp("m3") / "tiny-m3")
    clap = make_tiny_clap_audio(tmp_path_factory.mktemp("clap") / "tiny-clap", fusion=False)
    # with a key, and the pages opened by the operator: the page asks for the key
    srv = BentoServer({"MODEL_NAMES": f"{path};{clap}", "SERVED_MODEL_NAMES": "tiny-m3;tiny-clap",
                       "DTYPES": "fp32",
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "API_KEY": KEY,
                       "PUBLIC_PAGES": "true"},
                      tmp_path_factory.mktemp("m3-server") / "server.log")
    yield srv.start()
    srv.stop()


@pytest.fixture
def page(browser):
    """A fresh page whose requests anywhere but this machine's test servers are refused and
    recorded."""
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    outside: list[str] = []

    def only_the_server(route):
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert outside == []  # nothing fetched from elsewhere: no CDN, no fonts
    assert errors == []  # no script error on the page


def open_playground(page, server, model: str) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector(f"#model option[value='{model}']", state="attached")
    page.select_option("#model", model)


def api(server, path: str, body: dict, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def run_snippet(page, section: str, key: str | None = None) -> dict:
    """The Python lines the page shows for its request, run as they are (the key, if any, in
    API_KEY as they expect)."""
    code = page.inner_text(f"#{section} pre.snippet-python").replace(
        "print(response.json())", "import json; print(json.dumps(response.json()))")
    env = {**os.environ, **({"API_KEY": key} if key else {})}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_embed_and_similarity(page, dialect_server, shots):
    open_playground(page, dialect_server, MINILM)
    page.fill("#embed-texts", "\n".join(TEXTS))
    page.fill("#embed-dimensions", "128")
    page.click("#embed-run")
    page.wait_for_selector("#embed-out[data-done='1'] table.heatmap")
    shown = np.array(page.eval_on_selector_all(
        "#embed-out td[data-value]", "cells => cells.map(c => Number(c.dataset.value))")).reshape(4, 4)
    body = {"model": MINILM, "input": TEXTS, "dimensions": 128, "encoding_format": "float"}
    vectors = np.array([d["embedding"] for d in api(dialect_server, "/v1/embeddings", body)["data"]])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(shown, unit @ unit.T, atol=1e-6)
    assert shown[0, 1] > shown[0, 2]  # eating food ~ eating bread, more than carrying a baby
    # the lines shown send the same request
    assert run_snippet(page, "embed")["data"] == api(dialect_server, "/v1/embeddings", body)["data"]
    assert "curl -s " + dialect_server.url + "/v1/embeddings" in page.inner_text(
        "#embed pre.snippet-curl")
    page.screenshot(path=shots / "playground-embed.png", full_page=True)


@pytest.mark.slow
def test_every_option_of_embed(page, dialect_server):
    """Prompt, input type, output type, truncation and normalisation reach the request."""
    open_playground(page, dialect_server, MINILM)
    page.fill("#embed-texts", "\n".join(TEXTS[:2]))
    page.select_option("#embed-dtype", "ubinary")
    page.select_option("#embed-truncate", "END")
    page.select_option("#embed-input-type", "search_query")
    page.uncheck("#embed-normalized")
    page.click("#embed-run")
    page.wait_for_selector("#embed-out[data-done='1'] table.heatmap")
    body = {"model": MINILM, "input": TEXTS[:2], "encoding_format": "float",
            "input_type": "search_query", "truncate": "END", "output_dtype": "ubinary",
            "normalized": False}
    assert run_snippet(page, "embed")["data"] == api(dialect_server, "/v1/embeddings", body)["data"]
    packed = np.array([d["embedding"] for d in api(dialect_server, "/v1/embeddings",
                                                   body)["data"]], dtype=np.uint8)
    signs = np.unpackbits(packed, axis=1).astype(float) * 2 - 1
    expected = signs @ signs.T / signs.shape[1]
    shown = np.array(page.eval_on_selector_all(
        "#embed-out td[data-value]", "cells => cells.map(c => Number(c.dataset.value))")).reshape(2, 2)
    np.testing.assert_allclose(shown, expected, atol=1e-9)


def file_beside_texts(page, server, model: str, texts: list[str], path, kind: str, mime: str,
                      key: str | None = None) -> None:
    """Run the texts and the file at `path` (an image or audio file) on the page: its cosines
    are the API's for the same Jina-style items, and the file is named in the table."""
    import base64

    page.fill("#embed-texts", "\n".join(texts))
    page.set_input_files("#embed-files", str(path))
    page.click("#embed-run")
    page.wait_for_selector("#embed-out[data-done='1'] table.heatmap")
    shown = np.array(page.eval_on_selector_all(
        "#embed-out td[data-value]", "cells => cells.map(c => Number(c.dataset.value))"))
    uri = f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
    data = api(server, "/v1/embeddings", {
        "model": model, "encoding_format": "float",
        "input": [*({"text": text} for text in texts), {kind: uri}]}, key)["data"]
    vectors = np.array([d["embedding"] for d in data])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(shown.reshape(len(data), len(data)), unit @ unit.T, atol=1e-6)
    assert f"{kind} file 1" in page.inner_text("#embed-out table")


@pytest.mark.slow
def test_texts_and_an_image_file_on_an_image_model(page, dialect_server, tmp_path):
    """An image model takes image files beside texts (sent as data URIs, Jina-style items)."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    open_playground(page, dialect_server, "tiny-clip")
    assert page.is_visible("#embed-files")
    file_beside_texts(page, dialect_server, "tiny-clip", ["a red square", "a photo of the sea"],
                      tmp_path / "red.png", "image", "image/png")


@pytest.mark.slow
def test_texts_and_an_audio_file_on_an_audio_model(page, m3_server, tmp_path):
    """An audio model (CLAP) takes audio files beside texts, as `{"audio": ...}` items."""
    from audiofiles import encoded, tone

    (tmp_path / "tone.wav").write_bytes(encoded(tone(16000, 1.5, 440.0), 16000))
    page.goto(m3_server.url + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector("#model option[value='tiny-clap']", state="attached")
    page.select_option("#model", "tiny-clap")
    assert page.is_visible("#embed-files") and page.inner_text("#media-urls-label") == "Audio URLs"
    assert page.get_attribute("#embed-files", "accept") == "audio/*"
    file_beside_texts(page, m3_server, "tiny-clap", ["a dog barks", "rain falls on a tin roof"],
                      tmp_path / "tone.wav", "audio", "audio/wav", KEY)
    # the request shown sends the clip as an item (its data URI elided for display)
    assert '{"audio": "data:audio/wav;base64,' in page.inner_text("#embed pre.snippet-python")


def sparse_dot(a: dict, b: dict) -> float:
    weights = dict(zip(a["indices"], a["values"]))
    return sum(weights.get(i, 0.0) * v for i, v in zip(b["indices"], b["values"]))


@pytest.mark.slow
def test_sparse_vectors_and_multi_vectors(page, m3_server, shots):
    """A model with sparse and multi-vector outputs: SPLADE's dot products and ColBERT's MaxSim
    between the texts, from the API's vectors."""
    texts = TEXTS[:3]
    page.goto(m3_server.url + "/")  # public: the page loads; the API asks for the key
    page.wait_for_selector("#model-bar .error:not([hidden])")
    assert "401" in page.inner_text("#model-bar .error") and "API key" in page.inner_text(
        "#model-bar .error")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector("#model option[value='tiny-m3']", state="attached")
    assert page.is_hidden("#model-bar .error")
    page.fill("#embed-texts", "\n".join(texts))
    page.select_option("#embed-kind", "sparse")
    page.click("#embed-run")
    page.wait_for_selector("#embed-out[data-done='1'] table.heatmap")
    cells = "cells => cells.map(c => Number(c.dataset.value))"
    shown = np.array(page.eval_on_selector_all("#embed-out td[data-value]", cells)).reshape(3, 3)
    body = {"model": "tiny-m3", "encoding_format": "float", "input": texts,
            "return_sparse": True, "sparse_tokens": True}
    sparse = [d["sparse_embedding"] for d in api(m3_server, "/v1/embeddings", body, KEY)["data"]]
    assert run_snippet(page, "embed", KEY)["data"] == api(m3_server, "/v1/embeddings", body,
                                                          KEY)["data"]
    assert 'Authorization: Bearer $API_KEY' in page.inner_text("#embed pre.snippet-curl")
    assert KEY not in page.inner_text("#embed .snippets")  # the key itself is never shown
    np.testing.assert_allclose(shown, [[sparse_dot(a, b) for b in sparse] for a in sparse],
                               rtol=1e-6, atol=1e-9)
    assert page.locator("#embed-out ol.terms li").count() == 3
    page.screenshot(path=shots / "playground-sparse.png", full_page=True)
    page.select_option("#embed-kind", "multi")
    page.click("#embed-run")
    page.wait_for_selector("#embed-out[data-done='2'] table.heatmap")
    shown = np.array(page.eval_on_selector_all("#embed-out td[data-value]", cells)).reshape(3, 3)
    multi = [np.array(d["embedding"]) for d in api(m3_server, "/v1/embeddings", {
        "model": "tiny-m3", "input": texts, "return_multivector": True}, KEY)["data"]]
    maxsim = [[(q @ d.T).max(axis=1).mean() for d in multi] for q in multi]
    np.testing.assert_allclose(shown, maxsim, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_the_api_error_is_shown(page, dialect_server):
    open_playground(page, dialect_server, MINILM)
    page.fill("#embed-dimensions", "4096")
    page.click("#embed-run")
    page.wait_for_selector("#embed .error:not([hidden])")
    response = httpx.post(dialect_server.url + "/v1/embeddings", json={
        "model": MINILM, "input": TEXTS, "dimensions": 4096, "encoding_format": "float"})
    assert page.inner_text("#embed .error") == \
        f"{response.status_code}: {response.json()['error']['message']}"


@pytest.mark.slow
def test_rerank(page, dialect_server, shots):
    open_playground(page, dialect_server, "tiny-rerank")
    assert page.is_disabled("#tabs button[data-tab='embed']")  # a reranker does not embed
    page.click("#tabs button[data-tab='rerank']")
    query, documents = "What do people eat?", [*TEXTS, "Bread and rice are staple foods."]
    page.fill("#rerank-query", query)
    page.fill("#rerank-docs", "\n".join(documents))
    page.click("#rerank-run")
    page.wait_for_selector("#rerank-out[data-done='1'] ol.bars li")
    shown = page.eval_on_selector_all(
        "#rerank-out li", "items => items.map(i => [Number(i.dataset.index), "
                          "Number(i.dataset.score)])")
    results = api(dialect_server, "/v1/rerank", {"model": "tiny-rerank", "query": query,
                                                 "documents": documents})["results"]
    assert shown == [[r["index"], r["relevance_score"]] for r in results]  # ranked, as the API
    assert [s for _, s in shown] == sorted((s for _, s in shown), reverse=True)
    page.screenshot(path=shots / "playground-rerank.png", full_page=True)


@pytest.mark.slow
def test_tokenize(page, dialect_server, shots):
    open_playground(page, dialect_server, MINILM)
    page.click("#tabs button[data-tab='tokenize']")
    text = "Tokenizers split unbelievably long words into pieces."
    page.fill("#tokenize-text", text)
    page.click("#tokenize-run")
    page.wait_for_selector("#tokenize-out[data-done='1'] .token")
    shown = page.eval_on_selector_all(
        "#tokenize-out .token", "spans => spans.map(s => s.dataset.token || s.textContent)")
    item = api(dialect_server, "/v1/tokenize", {"model": MINILM, "input": text})["data"][0]
    assert shown == item["tokens"]
    assert page.inner_text("#tokenize-out .tokens").replace("[CLS]", "").replace(
        "[SEP]", "").strip() == text  # the pieces lie over the text itself
    page.screenshot(path=shots / "playground-tokenize.png", full_page=True)


@pytest.mark.slow
def test_the_api_docs(page, dialect_server, shots):
    """Swagger UI from the service's own files over its OpenAPI document; "try it" works."""
    page.goto(dialect_server.url + "/docs")
    block = page.locator("#operations-openai-post_v1_embeddings")
    block.wait_for()
    assert page.locator(".opblock").count() > 30  # every dialect's routes
    page.screenshot(path=shots / "docs.png")
    block.locator(".opblock-summary").click()
    page.click("#operations-openai-post_v1_embeddings .try-out__btn")
    body = json.dumps({"model": MINILM, "input": "hello"})
    page.fill("#operations-openai-post_v1_embeddings textarea.body-param__text", body)
    page.click("#operations-openai-post_v1_embeddings .execute")
    status = page.locator("#operations-openai-post_v1_embeddings .live-responses-table "
                          "tr.response .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "200"
    shown = page.inner_text("#operations-openai-post_v1_embeddings .live-responses-table "
                            ".response-col_description pre")
    assert json.loads(shown)["data"][0]["object"] == "embedding"
    page.screenshot(path=shots / "docs-try-it.png")


# --- without a browser: the routes and API_KEY ----------------------------------------------


def test_a_get_of_the_root_that_is_not_a_browser_keeps_its_answer(client):
    html = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert '<script src="/playground/playground.js">' in html.text
    plain = client.get("/", headers={"Accept": "application/json"})
    assert plain.status_code == 405 and plain.headers["allow"] == "POST"
    assert plain.json() == {"error": "method GET is not allowed on /",  # TEI's envelope, as before
                            "error_type": "Validation"}
    for path, kind in (("/docs", "text/html"), ("/docs/swagger-ui-bundle.js", "text/javascript"),
                       ("/docs/swagger-ui.css", "text/css"),
                       ("/playground/playground.js", "text/javascript")):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    for path in ("/docs/index.html", "/docs/swagger-ui.js.map", "/playground/index.html",
                 "/playground/..%2Fpages.py"):
        assert client.get(path).status_code == 404, path


def guarded(public: bool):
    from starlette.testclient import TestClient

    from embedding_worker.api.http import create_app
    from embedding_worker.api.middleware import RequestGuard
    from embedding_worker.config import Settings
    from embedding_worker.core.core import Core

    settings = Settings(api_key="sesame", public_pages=public)
    return TestClient(RequestGuard(create_app(Core(settings)), settings))


def test_the_pages_need_the_key_unless_the_operator_opens_them():
    html = {"Accept": "text/html"}
    closed = guarded(public=False)
    for path in ("/docs", "/docs/swagger-ui.css", "/playground/playground.js",
                 "/v1/openapi.json"):
        assert closed.get(path).status_code == 401, path
    assert closed.get("/", headers=html).status_code == 401
    opened = guarded(public=True)
    for path in ("/docs", "/docs/swagger-ui.css", "/playground/playground.js",
                 "/v1/openapi.json"):
        assert opened.get(path).status_code == 200, path
    assert opened.get("/", headers=html).status_code == 200
    # the API itself still needs it
    assert opened.get("/v1/models").status_code == 401
    assert opened.post("/", json={"inputs": "x"}).status_code == 401
    assert opened.post("/docs").status_code == 401
