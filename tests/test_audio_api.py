"""Audio through a real `bentoml serve` process: a tiny fused CLAP generated here, clips of every
format served by the loopback host (tests/imagehost.py) and sent as data URIs and base64, on every
route that takes audio (OpenAI's with `modality: "audio"`, Jina's `{"audio": ...}` items mixed
with text, Infinity's `/embeddings_audio`, a RunPod job); Cohere v2's refusal; the limits.

Vectors are held to transformers' `ClapModel.get_audio_features` / `get_text_features` on the
same preprocessed input (engine/clap.py's features of the decoded clip; tests/test_clap.py holds
those to transformers' extractor), so the whole path, fetch to response, is checked."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from audiofiles import FORMATS, encoded, tone
from embedding_worker.core.audio import decode
from embedding_worker.engine.clap import Clap
from models import make_tiny_clap_audio, make_tiny_embedder

RATE = 48000  # the tiny CLAP's
SECONDS = {"/a.wav": 0.6, "/a.flac": 1.0, "/a.ogg": 2.5, "/a.opus": 0.8, "/a.mp3": 1.7}
LIMITS = {"AUDIO_MAX_SECONDS": "3", "MAX_AUDIO_PER_REQUEST": "6", "AUDIO_MAX_BYTES": "400000"}


def clip_file(path: str) -> tuple[bytes, str]:
    """The clip of `path`: a different tone and length per format (the Ogg one is longer than
    the model's 1-second window: a fused model reads it whole and in windows)."""
    fmt, subtype, rate = {".wav": FORMATS[0], ".flac": FORMATS[2], ".ogg": FORMATS[3],
                          ".opus": FORMATS[4], ".mp3": FORMATS[5]}[path[path.rindex("."):]]
    hertz = 200 + 150 * list(SECONDS).index(path)
    data = encoded(tone(rate, SECONDS[path], hertz), rate, fmt, subtype)
    return data, {"WAV": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg",
                  "MP3": "audio/mpeg"}[fmt]


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return make_tiny_clap_audio(tmp_path_factory.mktemp("audio") / "tiny-clap", fusion=True)


@pytest.fixture(scope="module")
def audio_server(clap_dir, image_host, tmp_path_factory):
    from server import BentoServer

    for path in SECONDS:
        image_host.images[path] = clip_file(path)
    image_host.images["/long.wav"] = (encoded(tone(16000, 3.5), 16000), "audio/wav")
    image_host.images["/big.wav"] = (encoded(tone(48000, 2.5, channels=2), 48000, "WAV", "FLOAT"),
                                     "audio/wav")  # 960 kB
    embed_dir = make_tiny_embedder(tmp_path_factory.mktemp("audio") / "tiny-embed")
    srv = BentoServer({
        "MODEL_NAMES": f"{embed_dir};{clap_dir}", "SERVED_MODEL_NAMES": "tiny-embed;clap",
        "BATCH_SIZES": "4", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "IMAGE_FETCH_ALLOWED_NETWORKS": "127.0.0.2/32", "HTTP_CLIENT_TIMEOUT": "2", **LIMITS,
    }, tmp_path_factory.mktemp("audio-server") / "server.log")
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def clap(clap_dir):
    return Clap(clap_dir)


def unit(vectors: torch.Tensor) -> np.ndarray:
    out = vectors.detach().float().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def transformers_audio(clap: Clap, files: list[bytes]) -> np.ndarray:
    made = [clap.features(decode(data, RATE).samples) for data in files]
    with torch.inference_mode():
        return unit(clap.model.get_audio_features(
            input_features=torch.from_numpy(np.stack([mel for mel, _ in made])),
            is_longer=torch.tensor([[longer] for _, longer in made])))


def transformers_text(clap: Clap, texts: list[str]) -> np.ndarray:
    encoded_texts = clap.tokenizer(texts, padding=True, truncation=True, max_length=clap.window,
                                   return_tensors="pt")
    with torch.inference_mode():
        return unit(clap.model.get_text_features(**encoded_texts))


def post(server, path: str, body: dict, status: int = 200) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def vectors(payload: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in payload["data"]], dtype=np.float32)


def test_every_format_by_url_gives_transformers_vectors(audio_server, image_host, clap):
    paths = list(SECONDS)
    payload = post(audio_server, "/v1/embeddings", {
        "model": "clap", "modality": "audio", "input": [image_host.url(p) for p in paths]})
    expected = transformers_audio(clap, [image_host.images[p][0] for p in paths])
    np.testing.assert_allclose(vectors(payload), expected, atol=2e-5)
    assert [d["index"] for d in payload["data"]] == list(range(len(paths)))
    assert payload["usage"] == {"prompt_tokens": 0, "total_tokens": 0,
                                "audio_seconds": pytest.approx(sum(SECONDS.values()), abs=0.01)}
    # distinct clips, distinct vectors; the same clip again (the long one too), the same vector
    got = vectors(payload)
    assert np.abs(got @ got.T - np.eye(len(paths))).max() < 0.9999
    again = post(audio_server, "/v1/embeddings", {
        "model": "clap", "modality": "audio", "input": [image_host.url(p) for p in paths]})
    np.testing.assert_array_equal(vectors(again), got)
    # in other batches: the same up to float rounding (torch's kernels block by batch size)
    other = post(audio_server, "/v1/embeddings", {
        "model": "clap", "modality": "audio", "input": [image_host.url(p) for p in paths[::-1]]})
    np.testing.assert_allclose(vectors(other)[::-1], got, atol=1e-6)


def test_a_url_a_data_uri_and_bare_base64_are_the_same_clip(audio_server, image_host):
    data, mime = image_host.images["/a.flac"]
    raw = base64.b64encode(data).decode()
    payload = post(audio_server, "/v1/embeddings", {"model": "clap", "modality": "audio", "input": [
        image_host.url("/a.flac"), f"data:{mime};base64,{raw}", raw]})
    a, b, c = vectors(payload)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_text_and_audio_share_one_space_as_jina_items(audio_server, image_host, clap):
    # a text of ~60 tokens: cut at the text model's window (78 here), not at 20 tokens
    long_text = " ".join(["a dog barks at the door while the rain falls"] * 6)
    texts = ["a dog barks", long_text]
    payload = post(audio_server, "/v1/embeddings", {"model": "clap", "input": [
        {"text": texts[0]}, {"audio": image_host.url("/a.wav")}, texts[1]]})
    got = vectors(payload)
    np.testing.assert_allclose(got[[0, 2]], transformers_text(clap, texts), atol=2e-5)
    np.testing.assert_allclose(got[1], transformers_audio(clap, [image_host.images["/a.wav"][0]])[0],
                               atol=2e-5)
    tokens = [min(len(ids), clap.window) - 2 for ids in clap.tokenizer(texts)["input_ids"]]
    assert tokens[1] > 20
    cut = transformers_text(clap, [clap.tokenizer.decode(clap.tokenizer(long_text)["input_ids"][1:21])])
    assert not np.allclose(got[2], cut[0], atol=1e-3)
    assert payload["usage"] == {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens),
                                "audio_seconds": pytest.approx(0.6, abs=0.01)}
    text_only = post(audio_server, "/v1/embeddings", {"model": "clap", "input": texts})
    assert "audio_seconds" not in text_only["usage"]


def test_the_openai_sdk_sends_audio_unchanged(audio_server, image_host):
    import openai

    client = openai.OpenAI(base_url=f"{audio_server.url}/v1", api_key="unused")
    result = client.embeddings.create(model="clap", input=[image_host.url("/a.mp3")],
                                      extra_body={"modality": "audio"})
    direct = post(audio_server, "/v1/embeddings", {
        "model": "clap", "modality": "audio", "input": [image_host.url("/a.mp3")]})
    # the SDK asks for base64 and decodes float32: the same float32 values as the JSON list's
    np.testing.assert_array_equal(np.float32(result.data[0].embedding),
                                  np.float32(direct["data"][0]["embedding"]))


def test_infinitys_route_picks_the_audio_model(audio_server, image_host):
    body = {"input": [image_host.url("/a.opus")]}
    legacy = post(audio_server, "/embeddings_audio", body)
    assert legacy["model"] == "clap"
    ours = post(audio_server, "/v1/embeddings", {"model": "clap", "modality": "audio", **body})
    assert legacy["data"][0]["embedding"] == ours["data"][0]["embedding"]


def test_models_list_audio_and_a_text_model_refuses_it(audio_server, image_host):
    cards = {card["id"]: card for card in httpx.get(f"{audio_server.url}/v1/models").json()["data"]}
    assert cards["clap"]["capabilities"] == ["audio_embed", "embed"]
    assert cards["clap"]["sampling_rate"] == RATE and cards["clap"]["dimensions"] == 16
    assert "sampling_rate" not in cards["tiny-embed"]
    error = post(audio_server, "/v1/embeddings", {"model": "tiny-embed", "modality": "audio",
                                                  "input": [image_host.url("/a.wav")]}, 400)
    assert error["error"]["message"].startswith(
        "model 'tiny-embed' does not support audio embeddings; it supports: text embeddings")


def test_cohere_v2_has_no_content_type_for_audio(audio_server, image_host):
    error = post(audio_server, "/v2/embed", {
        "model": "clap", "input_type": "search_document", "embedding_types": ["float"],
        "inputs": [{"content": [{"type": "audio_url", "audio_url": image_host.url("/a.wav")}]}]},
        400)
    assert error["error"]["message"].startswith("inputs[0].content[0]: Cohere's embed API has no content "
                                       "type for audio")


@pytest.mark.parametrize("item, status, message", [
    ("/long.wav", 400, "input[1]: longer than 3 s (AUDIO_MAX_SECONDS)"),
    ("/big.wav", 400, "input[1]: larger than 400000 bytes (AUDIO_MAX_BYTES)"),
    ("/page.html", 400, "input[1]: not audio: 127.0.0.2 sent content-type text/html"),
    ("/red.png", 400, "input[1]: not audio this server reads (WAV, FLAC, Ogg (Vorbis, Opus) or MP3)"),
    ("/missing", 400, "input[1]: HTTP 404 from 127.0.0.2"),
    ("loopback", 400, "input[1]: address not allowed: '127.0.0.1' resolves to 127.0.0.1"),
    ("blackhole", 400, "input[1]: fetching timed out after 2 s (HTTP_CLIENT_TIMEOUT)"),
    ("data:text/plain;base64,aGk=", 400, "input[1]: data URI has media type 'text/plain'; "
                                         "expected audio/*"),
    ("file:///etc/passwd", 400, "input[1]: unsupported URL scheme 'file'"),
])
def test_what_is_refused_names_the_item(audio_server, image_host, item, status, message):
    url = {"loopback": image_host.url("/a.wav", host="127.0.0.1"),
           "blackhole": image_host.blackhole_url("/a.wav")}.get(item)
    url = url or (item if ":" in item else image_host.url(item))
    error = post(audio_server, "/v1/embeddings", {
        "model": "clap", "modality": "audio", "input": [image_host.url("/a.wav"), url]}, status)
    assert error["error"]["message"].startswith(message), error
    assert error["error"]["code"] == "invalid_audio"


def test_an_ogg_labelled_application_is_taken_and_refusals_are_counted(audio_server, image_host):
    """Ogg is often labelled application/ogg: taken as audio. A refused clip counts in
    embedding_worker_audio_fetch_failures_total."""
    data, _ = image_host.images["/a.ogg"]
    raw = base64.b64encode(data).decode()
    payload = post(audio_server, "/v1/embeddings", {"model": "clap", "modality": "audio",
                                                    "input": [f"data:application/ogg;base64,{raw}",
                                                              image_host.url("/a.ogg")]})
    a, b = vectors(payload)
    np.testing.assert_array_equal(a, b)

    failures = "embedding_worker_audio_fetch_failures_total"
    before = audio_server.metric(failures, model="clap")
    post(audio_server, "/v1/embeddings", {"model": "clap", "modality": "audio",
                                          "input": [image_host.url("/red.png")]}, 400)
    assert audio_server.metric(failures, model="clap") == before + 1


def test_too_many_clips_is_a_413(audio_server, image_host):
    error = post(audio_server, "/v1/embeddings", {
        "model": "clap", "modality": "audio", "input": [image_host.url("/a.wav")] * 7}, 413)
    assert "7 audio items, at most 6 per request (MAX_AUDIO_PER_REQUEST)" in error["error"]["message"]


def test_the_server_keeps_serving_after_refusals(audio_server, image_host, clap):
    """Refused and good requests at once: each gets its own answer, the good ones right."""
    from concurrent.futures import ThreadPoolExecutor

    good = {"model": "clap", "modality": "audio", "input": [image_host.url("/a.flac")]}
    bad = {"model": "clap", "modality": "audio", "input": [image_host.url("/red.png")]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: httpx.post(f"{audio_server.url}/v1/embeddings",
                                                        json=body, timeout=60),
                                [good, bad] * 6))
    expected = transformers_audio(clap, [image_host.images["/a.flac"][0]])[0]
    for i, answer in enumerate(answers):
        if i % 2:
            assert answer.status_code == 400
        else:
            assert answer.status_code == 200
            np.testing.assert_allclose(answer.json()["data"][0]["embedding"], expected, atol=2e-5)


async def test_clap_precision_follows_dtypes(clap_dir, clap):
    """DTYPES: auto is float32; bf16 is served (close to float32); a dtype a CLAP model does not
    run in fails the start with the reason."""
    from embedding_worker.config import Settings
    from embedding_worker.core.core import Core

    data = encoded(tone(48000, 0.7, 500.0), 48000)
    body = {"model": "clap", "modality": "audio", "input": [base64.b64encode(data).decode()]}
    expected = transformers_audio(clap, [data])
    for dtype, served, tolerance in (("auto", "float32", 2e-5), ("bf16", "bfloat16", 0.05)):
        core = Core(Settings(model_names=str(clap_dir), served_model_names="clap", dtypes=dtype))
        await core.start()
        try:
            assert core.models.get("clap").info.dtype == served
            got = np.array((await core.embeddings.create(body))["data"][0]["embedding"])
        finally:
            await core.stop()
        np.testing.assert_allclose(got, expected[0], atol=tolerance)
    core = Core(Settings(model_names=str(clap_dir), served_model_names="clap", dtypes="int8"))
    await core.start()
    try:
        assert core.engine.state == "failed"
        assert "a CLAP model runs in float32, float16, bfloat16" in core.engine.failure
    finally:
        await core.stop()


async def test_a_runpod_job_embeds_audio(clap_dir, image_host):
    from embedding_worker.api.runpod import make_handler
    from embedding_worker.config import Settings
    from embedding_worker.core.core import Core

    for path in SECONDS:
        image_host.images.setdefault(path, clip_file(path))
    data, mime = image_host.images["/a.wav"]
    core = Core(Settings(model_names=str(clap_dir), served_model_names="clap"))
    await core.start()
    try:
        handler = make_handler(core)
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        standard = await handler({"id": "j1", "input": {"model": "clap", "modality": "audio",
                                                        "input": [uri]}})
        proxied = await handler({"id": "j2", "input": {"openai_route": "/v1/embeddings",
                                                       "openai_input": {"model": "clap",
                                                                        "modality": "audio",
                                                                        "input": [uri]}}})
    finally:
        await core.stop()
    assert json.loads(json.dumps(standard)) == standard
    assert standard["data"][0]["embedding"] == proxied["data"][0]["embedding"]
    assert standard["usage"]["audio_seconds"] == pytest.approx(0.6, abs=0.01)


async def test_clips_of_concurrent_requests_share_batches(clap_dir, clap):
    """One clip per request, eight requests at once: the model runs them in shared batches (of
    BATCH_SIZES), and each request gets its own clip's vector."""
    import asyncio

    from embedding_worker.config import Settings
    from embedding_worker.core.core import Core

    files = [encoded(tone(48000, 0.3 + 0.1 * i, 300 + 40 * i), 48000) for i in range(8)]
    core = Core(Settings(model_names=str(clap_dir), served_model_names="clap", batch_sizes="4"))
    await core.start()
    try:
        model = core.models.get("clap")
        batcher = core.embeddings.clips(model)
        before = model.heartbeat.batches
        # the model held busy until every clip has reached the batcher, so that how fast the clips
        # decode cannot decide the batches: the first runs alone (an idle model is called at
        # once), a batch of 4 queues behind it, 3 wait
        model._lock.acquire()
        requests = asyncio.gather(*(core.embeddings.create({
            "model": "clap", "modality": "audio",
            "input": [base64.b64encode(data).decode()]}) for data in files))
        try:
            for _ in range(600):
                if batcher.in_flight == 2 and len(batcher._waiting) == 3:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"clips not queued: {batcher.in_flight} calls, {len(batcher._waiting)} waiting")
        finally:
            model._lock.release()
        answers = await requests
        batches = model.heartbeat.batches - before
    finally:
        await core.stop()
    assert batches == 3  # 1, 4, 3 clips: shared by the requests
    got = np.array([answer["data"][0]["embedding"] for answer in answers])
    np.testing.assert_allclose(got, transformers_audio(clap, files), atol=2e-5)
