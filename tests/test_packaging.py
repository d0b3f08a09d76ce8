"""Files the platforms read stay in step with the code: RunPod hub metadata, test inputs, cache."""

import json

import pytest

from conftest import MINILM, ROOT
from embedding_worker.config import Settings, model_cache_dir, onnx_cache_dir

# Read from the environment but set by platforms or the user, not configuration knobs.
NOT_KNOBS = {"runpod_pod_id", "runpod_endpoint_id", "runpod_webhook_get_job", "hf_home",
             "hf_hub_cache", "xdg_cache_home", "host", "port",
             "ray_address",  # `embedding-worker bulk`'s, not a worker's
             "public_pages"}  # the browser pages: a RunPod worker serves no HTTP of its own


def test_hub_json_lists_every_setting_with_its_default():
    env = {e["key"]: e["input"] for e in json.loads((ROOT / ".runpod/hub.json").read_text())["config"]["env"]}
    knobs = {name.upper(): field for name, field in Settings.model_fields.items() if name not in NOT_KNOBS}
    assert set(env) == set(knobs)
    for key, field in knobs.items():
        assert env[key]["default"] == field.default, key
        assert env[key]["description"] and env[key]["name"]


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        if name not in {"runpod_pod_id", "runpod_endpoint_id", "runpod_webhook_get_job", "hf_home", "hf_hub_cache",
                        "xdg_cache_home"}:
            assert f"`{name.upper()}`" in readme, name


def test_the_default_config_file_lists_the_built_in_defaults():
    lines = (ROOT / "configs/default.env").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert values  # the file claims every value in it is the built-in default
    for key, value in values.items():
        assert str(Settings.model_fields[key.lower()].default) == value, key


def test_test_input_is_the_seed_example_on_the_bundled_model():
    job = json.loads((ROOT / "test_input.json").read_text())
    assert job == {"input": {"model": MINILM, "input": "Hello, world!"}}


def test_runpod_tests_cover_every_route_and_modality():
    cases = json.loads((ROOT / ".runpod/tests.json").read_text())["tests"]
    routes = {c["input"].get("openai_route") for c in cases}
    assert {"/v1/models", "/v1/embeddings", "/v1/rerank"} <= routes
    modalities = {c["input"].get("modality") for c in cases}
    assert {"text", "image"} <= modalities
    assert any("query" in c["input"] and "docs" in c["input"] for c in cases)


@pytest.mark.parametrize("user, baked, volume, expected", [
    ({"hf_hub_cache": "/mine"}, True, True, None),
    ({"hf_home": "/mine"}, True, True, None),
    ({}, True, True, "baked"),
    ({}, False, True, "volume/huggingface-cache/hub"),
    ({}, False, False, None),
])
def test_model_cache_choice(tmp_path, user, baked, volume, expected):
    baked_dir, volume_dir = tmp_path / "baked", tmp_path / "volume"
    if baked:
        (baked_dir / "models--x--y").mkdir(parents=True)
    if volume:
        volume_dir.mkdir()
    settings = Settings(baked_model_cache=str(baked_dir), runpod_volume_path=str(volume_dir), **user)
    got = model_cache_dir(settings)
    assert got == (None if expected is None else str(tmp_path / expected))


@pytest.mark.parametrize("user, volume, expected", [
    ({"onnx_cache": "/mine"}, True, "/mine"),
    ({}, True, "volume/infinity-embedding-worker/onnx"),
    ({"xdg_cache_home": "/xdg"}, False, "/xdg/infinity-embedding-worker/onnx"),
])
def test_onnx_cache_choice(tmp_path, monkeypatch, user, volume, expected):
    monkeypatch.delenv("ONNX_CACHE", raising=False)  # conftest points the tests at a scratch one
    volume_dir = tmp_path / "volume"
    if volume:
        volume_dir.mkdir()
    got = onnx_cache_dir(Settings(runpod_volume_path=str(volume_dir), **user))
    assert got == (expected if expected.startswith("/") else str(tmp_path / expected))
