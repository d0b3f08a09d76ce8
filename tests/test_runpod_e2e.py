"""The real runpod SDK loops driving our handler in a separate process, and the CLI modes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from conftest import MINILM, ROOT, assert_like
from fakerunpod import FakeJobQueue
from server import clean_env, free_port, wait_ready

pytestmark = pytest.mark.slow

# Only for these tests: the SDK's production start-up checks (RAM, disk, a TCP probe to a public
# DNS server, GPU) would exit the process on this offline CPU machine.
SKIP_CHECKS = {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"}


def spawn(args: list[str], env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embedding_worker", *args], cwd=ROOT,
                            env=clean_env(**env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, log_path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(log_path.read_text())


def test_rp_serve_api_answers_runsync(tmp_path):
    port = free_port()
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = spawn(["runpod", "--rp_serve_api", "--rp_api_port", str(port)], SKIP_CHECKS, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/docs", proc, log_path)
        url = f"http://127.0.0.1:{port}/runsync"
        out = httpx.post(url, json={"input": {"model": MINILM, "input": ["Hello world", "hi"]}}, timeout=120).json()
        assert out["status"] == "COMPLETED", out
        assert [d["index"] for d in out["output"]["data"]] == [0, 1]
        assert len(out["output"]["data"][0]["embedding"]) == 384
        out = httpx.post(url, json={"input": {"openai_route": "/v1/models"}}, timeout=60).json()
        assert out["output"]["data"][0]["id"] == MINILM
        out = httpx.post(url, json={"input": {"model": "nope", "input": "x"}}, timeout=60).json()
        assert out["status"] == "FAILED" and "model 'nope' is not served here" in str(out["error"])
    finally:
        stop(proc)


def test_production_job_loop_posts_results_back(tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedding_worker.config import bundled_model_path

    jobs = [
        {"id": "job-embed", "input": {"model": MINILM, "input": "Hello, world!"}},
        {"id": "job-models", "input": {"openai_route": "/v1/models"}},
        {"id": "job-proxy", "input": {"openai_route": "/v1/embeddings",
                                      "openai_input": {"model": MINILM, "input": ["a", "b"], "encoding_format": "base64"}}},
        {"id": "job-bad", "input": {"model": MINILM, "input": ""}},
        {"id": "job-shape", "input": {"prompt": "hi"}},
    ]
    log_path = tmp_path / "worker.log"
    with FakeJobQueue(jobs) as queue, open(log_path, "wb") as log:
        # `auto` must pick the RunPod handler because RunPod's variables are present
        proc = spawn(["auto"], {**queue.env, **SKIP_CHECKS, "RUNPOD_MAX_CONCURRENCY": "7"}, log)
        try:
            assert queue.done.wait(180), (sorted(queue.results), log_path.read_text()[-3000:])
        finally:
            stop(proc)
    assert "concurrency: 7;" in log_path.read_text()  # RUNPOD_MAX_CONCURRENCY reached the SDK
    results = queue.results
    expected = SentenceTransformer(bundled_model_path(), device="cpu").encode(["Hello, world!"])[0]
    assert_like([results["job-embed"]["output"]["data"][0]["embedding"]], [expected])
    assert results["job-models"]["output"]["data"][0]["id"] == MINILM
    assert len(results["job-proxy"]["output"]["data"]) == 2
    assert "input[0]: empty string" in results["job-bad"]["error"]
    assert "unrecognised job input" in results["job-shape"]["error"]


def test_cli_serve_honours_port(tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = spawn(["serve"], {"PORT": str(port), "HOST": "127.0.0.1"}, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log_path, 120)
        out = httpx.post(f"http://127.0.0.1:{port}/runsync",
                         json={"input": {"model": MINILM, "input": "Hello world"}}).json()
        assert out["status"] == "COMPLETED"
    finally:
        stop(proc)


def test_cli_configuration_error_is_one_line():
    result = subprocess.run([sys.executable, "-m", "embedding_worker", "serve"], cwd=ROOT,
                            env=clean_env(DTYPES="fp64"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: DTYPES='fp64': 'fp64' is not a dtype; expected one of auto, fp32, "
        "float32, fp16, float16, half, bf16, bfloat16, int8, fp8"]


def test_runpod_mode_exits_with_one_line_when_weights_fail(tmp_path):
    """The SDK is imported in the background while the weights load: a failed load still ends the
    process at once (RunPod restarts it) with the reason on one line."""
    missing = tmp_path / "no-such-model"
    missing.mkdir()  # a local directory without weights: config accepts it, loading fails
    result = subprocess.run([sys.executable, "-m", "embedding_worker", "runpod"], cwd=ROOT,
                            env=clean_env(MODEL_NAMES=str(missing), **SKIP_CHECKS),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    failures = [line for line in result.stderr.splitlines() if "model loading failed" in line]
    assert len(failures) == 1, result.stderr[-3000:]
    assert "Starting Serverless Worker" not in result.stdout + result.stderr
