"""modality=image through the real service: tiny CLIP, real image host on loopback."""

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest


def embed(client, status=200, **body):
    response = client.post("/v1/embeddings", json={"model": "tiny-clip", **body})
    assert response.status_code == status, response.text
    return response.json()


def vectors(payload):
    return np.array([d["embedding"] for d in payload["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def clip_reference(tiny_models):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    path = tiny_models["clip"]
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)

    def image_features(images):
        with torch.no_grad():
            out = model.get_image_features(**processor(images=images, return_tensors="pt"))
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    def text_features(texts):
        with torch.no_grad():
            out = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True))
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    return image_features, text_features


def test_image_embeddings_match_direct_clip(client, image_host, clip_reference):
    from PIL import Image
    import io

    paths = ["/red.png", "/blue.gif", "/green.png", "/red.jpg"]
    got = vectors(embed(client, input=[image_host.url(p) for p in paths], modality="image"))
    images = [Image.open(io.BytesIO(image_host.images[p][0])).convert("RGB") for p in paths]
    np.testing.assert_allclose(got, clip_reference[0](images), atol=1e-4)
    assert not np.allclose(got[0], got[1])  # different images, different vectors


def test_clip_embeds_text_into_the_same_space(client, clip_reference):
    texts = ["a photo of a cat", "a red square"]
    got = vectors(embed(client, input=texts, modality="text"))
    np.testing.assert_allclose(got, clip_reference[1](texts), atol=1e-4)
    assert got.shape[1] == vectors(embed(client, input=["a"], modality="text")).shape[1] == 16


def test_same_image_by_url_data_uri_and_bare_base64(client, image_host):
    raw = base64.b64encode(image_host.images["/red.png"][0]).decode()
    payload = embed(client, modality="image",
                    input=[image_host.url("/red.png"), f"data:image/png;base64,{raw}", raw])
    a, b, c = vectors(payload)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert [d["index"] for d in payload["data"]] == [0, 1, 2]


def test_single_string_image_and_base64_encoding(client, image_host):
    payload = embed(client, input=image_host.url("/red.png"), modality="image", encoding_format="base64")
    (item,) = payload["data"]
    assert np.frombuffer(base64.b64decode(item["embedding"]), "<f4").shape == (16,)


def test_mixed_items_name_the_first_bad_index_and_do_not_disturb_others(client, image_host):
    good = [image_host.url("/red.png"), image_host.url("/blue.gif")]
    bad = good + [image_host.url("/missing"), image_host.url("/page.html")]

    def call(i):
        return i, client.post("/v1/embeddings", json={"model": "tiny-clip", "modality": "image",
                                                      "input": bad if i % 3 == 0 else good})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(24)))
    reference = vectors(embed(client, input=good, modality="image"))
    for i, response in results:
        if i % 3 == 0:
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["message"] == "input[2]: HTTP 404 from 127.0.0.2"
            assert error["code"] == "invalid_image" and error["param"] == "input"
        else:
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(vectors(response.json()), reference, atol=1e-5)


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.png", "http://10.0.0.7/x.png",
                                 "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png",
                                 "http://localhost/x.png"])
def test_private_addresses_are_refused_by_the_service(client, url):
    error = embed(client, 400, input=[url], modality="image")["error"]
    assert error["message"].startswith("input[0]: address not allowed:")


def test_image_limits(client, image_host):
    error = embed(client, 413, input=[image_host.url("/red.png")] * 9, modality="image")["error"]
    assert error["message"] == "input: 9 images, at most 8 per request (MAX_IMAGES_PER_REQUEST)"
    error = embed(client, 400, input=[image_host.url("/bomb.png")], modality="image")["error"]
    assert "over the limit of 50 megapixels" in error["message"]
    error = embed(client, 400, input=[image_host.url("/slow.png")], modality="image")["error"]
    assert error["message"] == "input[0]: fetching timed out after 2 s (HTTP_CLIENT_TIMEOUT)"


def test_dimensions_apply_to_images(client, image_host):
    got = vectors(embed(client, input=[image_host.url("/red.png")], modality="image", dimensions=4))
    assert got.shape == (1, 4) and abs(np.linalg.norm(got) - 1) < 1e-5
