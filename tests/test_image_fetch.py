"""MediaFetcher against a real loopback HTTP server, under the default and opt-in policies."""

import base64
import ipaddress

import pytest

from embedding_worker.config import Settings
from embedding_worker.core.errors import BadRequest, PayloadTooLarge
from embedding_worker.core.media import MediaFetcher, MediaPolicy, address_allowed
from imagehost import image_bytes


def fetcher(**overrides):
    settings = Settings(**{"http_client_timeout": 1.5, "image_fetch_allowed_networks": "127.0.0.2/32",
                           "max_images_per_request": 8, **overrides})
    return MediaFetcher(settings)


@pytest.fixture
async def default():
    f = fetcher()
    yield f
    await f.stop()


@pytest.fixture
async def trusting():
    f = fetcher(image_fetch_allow_private=True, image_fetch_allowed_networks="")
    yield f
    await f.stop()


async def fails(f, item, message):
    with pytest.raises(BadRequest) as info:
        await f.load_all([item])
    assert info.value.message.startswith("input[0]: ")
    assert message in info.value.message, info.value.message
    return info.value


async def test_formats_load_as_rgb(default, image_host):
    images = await default.load_all([image_host.url(p) for p in ("/red.png", "/red.jpg", "/blue.gif", "/octet.png")])
    assert [im.mode for im in images] == ["RGB"] * 4
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    assert images[2].getpixel((0, 0)) == (0, 0, 255)


async def test_same_image_by_url_data_uri_and_bare_base64(default, image_host):
    raw = image_host.images["/red.png"][0]
    b64 = base64.b64encode(raw).decode()
    a, b, c = await default.load_all([image_host.url("/red.png"), f"data:image/png;base64,{b64}", b64])
    assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.parametrize("path, message", [
    ("/missing", "HTTP 404 from 127.0.0.2"),
    ("/forbidden", "HTTP 403 from 127.0.0.2"),
    ("/page.html", "not an image: 127.0.0.2 sent content-type text/html"),
    ("/lying.png", "not a decodable image"),
    ("/slow.png", "fetching timed out after 1.5 s (HTTP_CLIENT_TIMEOUT)"),
    ("/drip.png", "fetching timed out after 1.5 s"),
    ("/endless.png", "larger than 20000000 bytes (IMAGE_MAX_BYTES)"),
    ("/bomb.png", "image is too large (900.0 megapixels), over the limit of 50 megapixels"),
    ("/redirect/4", "more than 3 redirects (IMAGE_MAX_REDIRECTS)"),
    ("/to-loopback", "address not allowed: '127.0.0.1' resolves to 127.0.0.1"),
    ("/to-file", "unsupported URL scheme 'file' (redirect target)"),
    ("/reset.png", "could not fetch from 127.0.0.2"),
])
async def test_bad_hosts_and_bodies(default, image_host, path, message):
    error = await fails(default, image_host.url(path), message)
    assert error.status == 400 and error.code == "invalid_image"


async def test_short_redirect_chain_is_followed(default, image_host):
    (image,) = await default.load_all([image_host.url("/redirect/2")])
    assert image.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://10.1.2.3/x.png", "http://169.254.169.254/latest/meta-data",
    "http://[::1]/x.png", "http://localhost/x.png", "http://[::ffff:127.0.0.1]/x.png",
    "http://192.168.1.1/x.png", "http://0.0.0.0/x.png", "http://[fe80::1]/x.png",
    "http://224.0.0.1/x.png", "http://100.64.0.1/x.png",
])
async def test_private_addresses_refused_by_default(default, url):
    await fails(default, url, "address not allowed")


async def test_opt_in_fetches_private_addresses(trusting, image_host):
    images = await trusting.load_all([image_host.url("/red.png", host="127.0.0.1"),
                                      image_host.url("/to-loopback"),
                                      image_host.url("/red.png", host="localhost")])
    assert all(im.getpixel((0, 0)) == (255, 0, 0) for im in images)


@pytest.mark.parametrize("item, message", [
    ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ("data:text/plain;base64,aGVsbG8=", "data URI has media type 'text/plain'; expected image/*"),
    ("data:image/png,rawbytes", "only base64 data URIs are supported"),
    ("data:image/png;base64,@@@@", "data URI is not valid base64"),
    ("not an image at all", "not an http(s) URL, a data URI or base64-encoded image data"),
    ("QUJD=x", "base64 image is not valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), "not a decodable image"),
    ("http://no-such-host.invalid/a.png", "cannot resolve host 'no-such-host.invalid'"),
])
async def test_bad_items(default, item, message):
    await fails(default, item, message)


async def test_pixel_limit_checked_from_header_before_decoding(image_host):
    f = fetcher(image_max_pixels=1000)  # 40x30 = 1200 pixels
    raw = base64.b64encode(image_host.images["/red.png"][0]).decode()
    with pytest.raises(BadRequest, match=r"input\[0\]: image is 40x30 \(0.0 megapixels\), over the limit of 0.001 megapixels"):
        await f.load_all([raw])


async def test_data_uri_size_cap():
    f = fetcher(image_max_bytes=1000)
    big = base64.b64encode(image_bytes("PNG", size=(400, 400)) + b"\0" * 2000).decode()
    with pytest.raises(BadRequest, match=r"input\[0\]: data URI is larger than 1000 bytes"):
        await f.load_all([f"data:image/png;base64,{big}"])


async def test_first_bad_index_is_named(default, image_host):
    items = [image_host.url("/red.png"), image_host.url("/red.jpg"), image_host.url("/missing"), "garbage!"]
    with pytest.raises(BadRequest) as info:
        await default.load_all(items)
    assert info.value.message == "input[2]: HTTP 404 from 127.0.0.2"


async def test_too_many_images(default, image_host):
    with pytest.raises(PayloadTooLarge, match=r"input: 9 images, at most 8 per request"):
        await default.load_all([image_host.url("/red.png")] * 9)


def test_address_policy_unit():
    policy = MediaPolicy(1, 1, 1, 1, 1.0, False, ())
    ip = ipaddress.ip_address
    assert address_allowed(ip("8.8.8.8"), policy)
    assert address_allowed(ip("2606:4700::1111"), policy)
    for bad in ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254", "::1",
                "fe80::1", "fc00::1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::",
                "224.0.0.1", "ff02::1", "0.0.0.0", "240.0.0.1", "100.64.0.1"]:
        assert not address_allowed(ip(bad), policy), bad
