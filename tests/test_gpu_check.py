"""bench/gpu-check --dry-run end to end on the CPU (tiny sizes): every step runs and its output
folder holds what a GPU run would bring back, so the script cannot rot before a GPU comes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server import clean_env

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_dry_run_writes_the_whole_report(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([str(ROOT / "bench" / "gpu-check"), "--dry-run", "--out", str(out)],
                          env=clean_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    # what comes back from a device machine: at most 8 files, none in a folder
    assert sorted(p.name for p in out.iterdir()) == [
        "log.txt", "profile.txt", "pytest.txt", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "dry-run"
    assert [s["name"] for s in results["steps"]] == ["environment", "preflight", "pytest", "matmul", "throughput"]
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in results["steps"])

    tests = results["tests"]
    assert {t["outcome"] for t in tests.values()} == {"passed", "skipped"}
    assert tests["test_cuda_out_of_memory_fails_that_request_only"]["outcome"] == "skipped"
    assert tests["test_reduced_precision_matches_fp32_on_the_device_and_the_cpu"]["properties"][
        "cosine_min_embed-auto_vs_fp32"] >= 0.999
    assert results["matmul"]["flops_per_s"] > 0

    cells = results["throughput"]["cells"]
    assert {(c["model"], c["tokens"], c["cell"]) for c in cells} == {
        (m, t, c) for m in ("small", "base") for t in (128, 512) for c in ("latency", "throughput")}
    for cell in cells:
        assert cell["errors"] == 0 and cell["requests"] > 0
        assert cell["tokens_per_s"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert cell["flops_per_s"] > 0 and cell["fraction_of_matmul"] > 0
    profile = results["throughput"]["profile"]
    assert profile["samples"] > 0 and profile["process_cpu_fraction"] > 0
    assert {"event loop", "model: forward", "model: pre-process"} <= set(profile["threads"])
    assert results["bottleneck"].startswith("GPU busy unknown; the host: the ")

    summary = (out / "summary.md").read_text()
    assert "**Bottleneck of the profiled cell:**" in summary and "| base | 512 | throughput |" in summary
    assert "[model: forward] CPU" in (out / "profile.txt").read_text()
    assert "passed" in (out / "pytest.txt").read_text()
