"""Broken and hostile image hosts, through the real HTTP path (tiny CLIP, modality=image).

Every fault must come back as the OpenAI error envelope with a 4xx naming the item (`input[i]`),
within about one fetch deadline (HTTP_CLIENT_TIMEOUT=2 in conftest), never a 5xx or a hang; and
the next valid request must still succeed.
"""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from embedding_worker.config import Settings
from embedding_worker.core.errors import BadRequest
from embedding_worker.core.media import MediaFetcher, MediaPolicy
from imagehost import image_of, png_bomb, truncated

TIMEOUT = 2.0  # HTTP_CLIENT_TIMEOUT in conftest's served_env
TIMED_OUT = "fetching timed out after 2 s (HTTP_CLIENT_TIMEOUT)"
UNDECODABLE = "not a decodable image"


def post(client, items):
    return client.post("/v1/embeddings", json={"model": "tiny-clip", "modality": "image", "input": items})


def assert_clean_4xx(response, index: int, *fragments: str, status: int = 400) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_image" and error["param"] == "input", error
    assert error["message"].startswith(f"input[{index}]: "), error["message"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error["message"]


def assert_ok(response, count: int) -> None:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(count))
    assert all(len(d["embedding"]) == 16 for d in data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def still_serving(client, image_host):
    """After each fault, a valid request still gets its embeddings."""
    yield
    assert_ok(post(client, [image_host.url("/red.png"), image_host.url("/blue.gif")]), 2)


# --- (a) connection resets and refusals: a fast, clean 400 -------------------------------------

@pytest.mark.parametrize("path", [
    "/fault/rst-before-headers",  # request read, RST, nothing sent
    "/fault/rst-mid-headers",  # "HTTP/1.1 200 OK\r\nContent-Type: ima" then RST
    "/fault/rst-mid-body",  # headers, half the body, RST
    "/fault/close-mid-body",  # headers, half the body, clean FIN (Content-Length not met)
])
def test_connection_reset(client, image_host, still_serving, path):
    start = time.monotonic()
    response = post(client, [image_host.url("/red.png"), image_host.url(path)])
    assert_clean_4xx(response, 1, "could not fetch from 127.0.0.2")
    assert time.monotonic() - start < TIMEOUT  # an error, not a wait for the deadline


def test_connection_refused(client, image_host, still_serving):
    response = post(client, [image_host.refused_url()])
    assert_clean_4xx(response, 0, "could not fetch from 127.0.0.2: ConnectError")


# --- (b) stalls: the per-image deadline cuts them ------------------------------------------------

STALLS = [
    "/fault/stall-silent",  # reads the request, never answers
    "/fault/stall-after-headers",  # headers, then nothing
    "/fault/drip-headers",  # headers a byte every 0.2 s: no single read ever times out
    "/fault/drip-body",  # headers at once, then the body a byte every 0.2 s
    "blackhole",  # a listener that never accepts: the handshake completes, nobody reads
]


@pytest.fixture(scope="module")
def stalled(client, image_host):
    """All the stalls at once (one deadline's wait for the lot): path -> (response, seconds)."""

    def call(path):
        url = image_host.blackhole_url() if path == "blackhole" else image_host.url(path)
        start = time.monotonic()
        response = post(client, [image_host.url("/red.png"), url])
        return path, (response, time.monotonic() - start)

    with ThreadPoolExecutor(len(STALLS)) as pool:
        return dict(pool.map(call, STALLS))


@pytest.mark.parametrize("path", STALLS)
def test_stalling_host_is_cut_by_the_deadline(stalled, still_serving, path):
    response, seconds = stalled[path]
    assert assert_clean_4xx(response, 1) == f"input[1]: {TIMED_OUT}"
    assert TIMEOUT * 0.9 <= seconds < TIMEOUT + 2.5, seconds


async def test_cut_connections_do_not_leak_from_the_pool(image_host):
    """Deadline-cancelled fetches must give their connections back: with a pool of 2, three
    rounds of two stalls each, and then a valid image still loads at once."""
    settings = Settings(http_client_timeout=0.4, http_client_max_connections=2,
                        http_client_max_keepalive_connections=1,
                        image_fetch_allowed_networks="127.0.0.2/32")
    fetcher = MediaFetcher(settings)
    try:
        for _ in range(3):
            with pytest.raises(BadRequest, match=r"input\[0\]: fetching timed out after 0.4 s"):
                await fetcher.load_all([image_host.url("/fault/stall-after-headers"),
                                        image_host.url("/fault/drip-body")])
        start = time.monotonic()
        (image,) = await fetcher.load_all([image_host.url("/red.png")])
        assert image.getpixel((0, 0)) == (255, 0, 0)
        assert time.monotonic() - start < 0.4
    finally:
        await fetcher.stop()


# --- (c) content types that lie: we decode by content ------------------------------------------

@pytest.mark.parametrize("path, message", [
    ("/fault/html-as-png", UNDECODABLE),
    ("/fault/random-as-png", UNDECODABLE),
    ("/fault/empty-as-png", UNDECODABLE),
    ("/page.html", "not an image: 127.0.0.2 sent content-type text/html"),  # honest, and not an image
])
def test_non_image_bodies_are_a_clean_400(client, image_host, still_serving, path, message):
    assert_clean_4xx(post(client, [image_host.url("/red.png"), image_host.url(path)]), 1, message)


@pytest.mark.parametrize("path", ["/fault/png-as-html", "/fault/png-as-text", "/fault/png-untyped",
                                  "/octet.png"])
def test_real_image_with_a_wrong_or_missing_type_is_used(client, image_host, path):
    """The body decides: a real PNG labelled text/html (a misconfigured bucket) embeds exactly
    like the same PNG served as image/png."""
    response = post(client, [image_host.url(path), image_host.url("/red.png")])
    assert_ok(response, 2)
    first, second = (d["embedding"] for d in response.json()["data"])
    assert first == pytest.approx(second, abs=1e-6)


# --- (d) truncated and corrupt images ------------------------------------------------------------

@pytest.mark.parametrize("path", ["/fault/truncated.png", "/fault/header-only.png",
                                  "/fault/corrupt.png", "/fault/truncated.jpg"])
def test_truncated_or_corrupt_image_is_a_clean_400(client, image_host, still_serving, path):
    assert_clean_4xx(post(client, [image_host.url("/red.png"), image_host.url(path)]), 1, UNDECODABLE)


def test_truncated_image_in_a_data_uri_is_a_clean_400(client, image_host, still_serving):
    cut = truncated(image_host.servers[0].big_png)
    response = post(client, [f"data:image/png;base64,{b64(cut)}", b64(cut)])
    assert_clean_4xx(response, 0, UNDECODABLE)


def crafted_tiff() -> bytes:
    """A TIFF whose StripOffsets tag claims the type DOUBLE: PIL raises TypeError, not OSError."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("I", (10, 10)).save(buffer, format="TIFF")
    data = buffer.getvalue()
    at = data.index(b"\x11\x01\x04\x00") + 2  # tag 273 (StripOffsets), type 4 (LONG)
    return data[:at] + b"\x0c\x00" + data[at + 2:]


def test_crafted_file_that_breaks_the_decoder_oddly_is_a_clean_400(client, image_host, still_serving):
    image_host.images["/fault/crafted.tiff"] = (crafted_tiff(), "image/tiff")
    response = post(client, [image_host.url("/red.png"), image_host.url("/fault/crafted.tiff")])
    assert_clean_4xx(response, 1, "not a decodable image (TypeError)")
    assert_clean_4xx(post(client, [b64(crafted_tiff())]), 0, "not a decodable image (TypeError)")


# --- images too small for the model --------------------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (2, 40), (40, 2), (1, 3)])
def test_image_under_3_pixels_a_side_is_a_clean_400(client, still_serving, size):
    """The model's processor cannot take a side under 3 pixels (a 1x1 tracking pixel, say)."""
    response = post(client, [b64(image_of((8, 8))), b64(image_of(size))])
    w, h = size
    assert_clean_4xx(response, 1, f"image is {w}x{h} pixels; each side must be at least 3 pixels")


def test_3x3_image_is_fine(client):
    assert_ok(post(client, [b64(image_of((3, 3)))]), 1)


# --- aspect-ratio bombs --------------------------------------------------------------------------
# CLIP-style processors scale the SHORT side to the model's size before the centre crop, so a
# 1x40000 image (tiny in bytes and pixels) becomes 224 x 8,960,000 in memory. Refused from the
# header, before decoding, above IMAGE_MAX_ASPECT_RATIO (long side / short side, default 20).

@pytest.mark.parametrize("size", [(3, 60), (60, 3), (100, 2000), (40, 30)])
def test_aspect_ratio_at_the_limit_is_fine(client, size):
    assert_ok(post(client, [b64(image_of(size))]), 1)


@pytest.mark.parametrize("size, ratio", [((3, 61), "20.33"), ((61, 3), "20.33"), ((100, 2001), "20.01")])
def test_aspect_ratio_over_the_limit_is_a_clean_400(client, still_serving, size, ratio):
    response = post(client, [b64(image_of((8, 8))), b64(image_of(size))])
    w, h = size
    message = assert_clean_4xx(response, 1)
    assert message == (f"input[1]: image is {w}x{h} (aspect ratio {ratio}:1), over the limit of 20:1 "
                       "(IMAGE_MAX_ASPECT_RATIO)")


def test_aspect_ratio_bomb_is_refused_from_the_header(client, image_host, still_serving):
    """A real 4x40000 PNG served over HTTP, and a PNG whose header claims 3x5000000 with a few
    rows of data behind it (so only a header check can refuse it), both refused fast."""
    bomb = image_of((4, 40000))
    assert len(bomb) < 2000  # small in bytes; 160,000 pixels, far under IMAGE_MAX_PIXELS
    image_host.images["/fault/thin.png"] = (bomb, "image/png")
    start = time.monotonic()
    response = post(client, [image_host.url("/fault/thin.png")])
    assert_clean_4xx(response, 0, "image is 4x40000 (aspect ratio 10000:1), over the limit of 20:1")
    response = post(client, [b64(png_bomb(3, 5_000_000))])
    assert_clean_4xx(response, 0, "image is 3x5000000 (aspect ratio 1666666.67:1)",
                     "(IMAGE_MAX_ASPECT_RATIO)")
    assert time.monotonic() - start < 1.5


def test_aspect_ratio_limit_comes_from_the_setting(monkeypatch):
    monkeypatch.setenv("IMAGE_MAX_ASPECT_RATIO", "2.5")
    policy = MediaPolicy.from_settings(Settings())
    assert policy.max_aspect_ratio == 2.5


async def test_aspect_ratio_limit_is_applied_by_the_fetcher():
    fetcher = MediaFetcher(Settings(image_max_aspect_ratio=2.5))
    (image,) = await fetcher.load_all([b64(image_of((10, 25)))])
    assert image.size == (10, 25)
    with pytest.raises(BadRequest, match=r"^input\[0\]: image is 26x10 \(aspect ratio 2.6:1\), over "
                                         r"the limit of 2.5:1 \(IMAGE_MAX_ASPECT_RATIO\)$"):
        await fetcher.load_all([b64(image_of((26, 10)))])
