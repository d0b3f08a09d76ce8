"""What a start costs: `embedding-worker serve` is one process that imports only what the
configuration uses (no torch, transformers, sentence-transformers or infinity for models ONNX
Runtime serves; no PIL or httpx without an image; no RunPod SDK outside RunPod mode), and it still
does what `bentoml serve` does: routes, batchable methods, /metrics, graceful SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import MINILM, SCRATCH_CACHE
from embedding_worker.engine import runtime
from server import ROOT, clean_env, free_port, wait_ready

pytestmark = pytest.mark.slow

HEAVY = {"torch", "transformers", "sentence_transformers", "infinity_emb", "optimum"}
IMAGE_STACK = {"PIL"}  # (httpx comes with BentoML itself; our fetcher's client opens on an image)


def imported(log: str) -> set[str]:
    """Top-level packages a process imported, from its PYTHONPROFILEIMPORTTIME lines."""
    return {match.group(1).split(".")[0]
            for match in re.finditer(r"^import time:\s+-?\d+ \|\s+\d+ \|\s+([\w.]+)", log, re.M)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = clean_env(PORT=str(port), HOST="127.0.0.1", PYTHONPROFILEIMPORTTIME="1",
                    XDG_CACHE_HOME=SCRATCH_CACHE)
    env.pop("ONNX_CACHE", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "embedding_worker", "serve"], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    yield proc, url, log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_serve_is_one_process_that_imports_no_torch(served):
    proc, url, log = served
    answer = httpx.post(f"{url}/v1/embeddings", json={"model": MINILM, "input": ["a", "b"]})
    assert answer.status_code == 200 and len(answer.json()["data"]) == 2
    assert psutil.Process(proc.pid).children(recursive=True) == []  # no arbiter, no worker
    modules = imported(log.read_text())
    lean = runtime.for_this_cpu("auto").runtime  # onnxruntime, or openvino on an AMX CPU
    assert "bentoml" in modules and lean in modules and "tokenizers" in modules
    assert not modules & (HEAVY | IMAGE_STACK | {"runpod"}), modules & (HEAVY | IMAGE_STACK)


def test_serve_loads_the_weights_while_bentoml_imports(served):
    """The engine's load (here: making the model's ONNX export) begins before the service module
    (BentoML and all) has finished importing. Import-time lines are written as each import
    completes, in order with the log's lines."""
    _, _, log = served
    lines = log.read_text().splitlines()
    # its depth varies: the import-time lines of the engine's thread (openvino, onnxruntime)
    # interleave with the main thread's and shift the nesting the log shows
    service = next(i for i, line in enumerate(lines) if re.match(r"import time:.*\|\s+service$", line))
    load = next(i for i, line in enumerate(lines) if "to ONNX" in line or "ONNX export of" in line)
    assert load < service
    assert any("the models loaded in" in line for line in lines)


def test_serve_lists_the_files_it_loaded_for_the_next_start(served, tmp_path):
    from embedding_worker.api import readahead
    from embedding_worker.config import Settings

    _, _, log = served
    cache = os.path.join(SCRATCH_CACHE, "infinity-embedding-worker", "onnx")
    deadline = time.monotonic() + 10
    listed = os.path.join(cache, readahead.list_name())
    while not os.path.isfile(listed):  # (renamed into place whole)
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    files = open(listed).read().split()
    lean = runtime.for_this_cpu("auto").runtime
    assert any("/bentoml/" in f for f in files) and any(f"/{lean}/" in f for f in files)
    assert all(os.path.isfile(f) for f in files)
    # a stale list (a file gone since) is only a hint: the read-ahead skips what is missing
    stale = tmp_path / "list.txt"
    stale.write_text(f"{tmp_path}/gone.pyc\n{files[0]}\n")
    readahead._hint(stale)
    assert readahead.find_list(Settings(onnx_cache=cache)) == readahead.list_file(
        Settings(onnx_cache=cache)) == Path(listed)


HANDOFF = """
import gc, sys, runpod, uvicorn
from embedding_worker import startgc
from embedding_worker.cli import main
def collections():
    return sum(generation["collections"] for generation in gc.get_stats())
paused, resumed = [], []
pause, resume = startgc.pause, startgc.resume
def counted_pause():
    paused.append(collections())
    pause()
def counted_resume():  # the collections from the pause to the collector's return
    resumed.append(collections() - paused[0])
    resume()
def handoff(*args, **options):  # where the start ends and serving would begin: look, then exit
    print("handoff", gc.isenabled(), gc.get_freeze_count(), resumed, flush=True)
startgc.pause, startgc.resume = counted_pause, counted_resume
uvicorn.run = handoff  # serve mode's server
runpod.serverless.start = handoff  # RunPod mode's job loop
main([sys.argv[1]])
"""


@pytest.mark.parametrize("mode", ["serve", "runpod"])
def test_the_collector_rests_while_a_mode_starts_and_is_back_for_serving(mode):
    done = subprocess.run([sys.executable, "-c", HANDOFF, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env=clean_env(PORT=str(free_port()), XDG_CACHE_HOME=SCRATCH_CACHE))
    found = re.search(r"^handoff (\w+) (\d+) (\[.*\])$", done.stdout, re.M)
    assert found, done.stdout + done.stderr[-2000:]
    enabled, frozen, resumed = found.groups()
    # resumed once, after no collection while the mode imported and the models loaded; the
    # start's objects frozen, the collector on for serving
    assert resumed == "[0]" and enabled == "True" and int(frozen) > 10_000


def test_a_list_that_cannot_be_made_ahead_says_why_and_fails_nothing(tmp_path, capsys, monkeypatch):
    from embedding_worker.api import readahead

    monkeypatch.setenv("MODEL_NAMES", str(tmp_path / "no-such-model"))
    assert readahead.record_ahead(str(tmp_path / "onnx"), timeout=60) is None
    said = capsys.readouterr().err
    assert "no read-ahead list made" in said and "no-such-model" in said
    assert not (tmp_path / "onnx" / readahead.list_name()).exists()


def test_serve_has_what_bentoml_serve_has(served):
    _, url, _ = served
    batch = httpx.post(f"{url}/batch/embed", json={"items": [{"model": MINILM, "text": "x"}]})
    assert batch.status_code == 200 and len(batch.json()[0]) == 384
    for _ in range(2):  # the second from the embedding cache
        httpx.post(f"{url}/v1/embeddings", json={"model": MINILM, "input": "counted"})
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert re.search(r'embedding_worker_cache_lookups_total\{model="[^"]+",result="hit"\} [1-9]',
                     metrics)
    assert re.search(r'embedding_worker_requests_total\{model="[^"]+",operation="embed",'
                     r'outcome="ok"\} [1-9]', metrics)
    assert "bentoml_service_request_total" in metrics  # BentoML's own instruments too
    assert httpx.get(f"{url}/livez").status_code == 200
    assert httpx.get(f"{url}/v1/openapi.json").status_code == 200
    assert httpx.post(f"{url}/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404


def test_sigterm_finishes_accepted_requests_then_exits(served):
    proc, url, log = served
    results: list[int] = []
    body = {"model": MINILM, "input": [f"text number {i} " * 40 for i in range(256)]}
    sender = threading.Thread(target=lambda: results.append(
        httpx.post(f"{url}/v1/embeddings", json=body, timeout=120).status_code))
    sender.start()
    time.sleep(0.5)  # accepted and computing
    os.killpg(proc.pid, signal.SIGTERM)
    sender.join(120)
    assert results == [200]
    # uvicorn re-raises the signal once it has shut down: the status says SIGTERM, as a
    # container runtime expects of a process it stopped
    assert proc.wait(60) in (0, -signal.SIGTERM)
    assert "stopped: the engines are shut down" in log.read_text()  # the shutdown hook ran
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/livez", timeout=2)
