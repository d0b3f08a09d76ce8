"""bench/gpu-check: the GPU tests, the matrix rate and the throughput through the server, on one
GPU machine in one command, everything written to one folder.

    bench/gpu-check [--dry-run] [--out DIR] [--budget SECONDS]

Steps, each a subprocess with its own limit inside the budget (default 540 s, the wheels'
install included): the machine (Python, torch, GPU); installing `.whl/` (bench/gpu-wheels)
unless bentoml and infinity-emb import already; importing the service's stack; `pytest -m gpu
tests/test_gpu.py`; the bf16 matrix rate; throughput and the profile. `--dry-run` runs the same
steps on the CPU with tiny sizes (tests/test_gpu_check.py does, in CI). The folder (`--out`, else
$OUT, else ./gpu-check-out) gets summary.md, results.json, pytest.txt, profile.txt and log.txt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gpucheck import summary
from gpucheck.steps import Runner, Step

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
# per-step limits (s), GPU / dry run; the sum exceeds the budget on purpose: the budget decides
LIMITS = {"environment": (60, 60), "install": (120, 60), "preflight": (90, 60),
          "pytest": (270, 120), "matmul": (60, 30), "throughput": (300, 120)}


def base_env(dry: bool, site: Path | None) -> dict[str, str]:
    paths = [str(site)] if site else []
    paths += [str(WHEELS / "extra"), str(ROOT / "src"), str(ROOT / "bench")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    if dry:
        env["GPU_TESTS_ON_CPU"] = "1"
    return env


def installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("bentoml", "infinity_emb"))


def install(runner: Runner, site: Path, limit: float) -> str | None:
    """pip-install the carried wheels into `site` (no index, no deps: all of them are there).
    Returns why not, if it did not."""
    manifest = WHEELS / "MANIFEST.json"
    if not manifest.exists():
        return f"{manifest} missing: run bench/gpu-wheels first (it needs a registry)"
    python = ".".join(map(str, sys.version_info[:2]))
    wanted = json.loads(manifest.read_text())["python"]
    if python != wanted:
        return f"the wheels are for CPython {wanted}, this is {python}: bench/gpu-wheels --python {python}"
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site)]
    step = runner.run("install", command + wheels, limit,
                      shown=" ".join(command) + f" .whl/*.whl ({len(wheels)} wheels)")
    return None if step.status == "ok" else step.note or step.status


def junit(path: Path) -> dict:
    """Outcome and recorded properties of each test in pytest's junit report."""
    if not path.exists():
        return {}
    tests = {}
    for case in ET.parse(path).iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                reason = found.get("message", "")
                break
        else:
            reason = ""
        props = {p.get("name"): _number(p.get("value")) for p in case.iter("property")}
        tests[case.get("name")] = {"outcome": outcome, "reason": reason[:300], "properties": props}
    return tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny sizes (CI)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole check")
    args = parser.parse_args()
    began = time.monotonic()
    out, dry = args.out.resolve(), args.dry_run
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    runner = Runner(out / "log.txt", args.budget, base_env(dry, None), ROOT)
    mode = "dry run (CPU, tiny sizes: the numbers mean nothing)" if dry else "GPU"
    runner.say(f"gpu-check: {mode}; out {out}; budget {args.budget:.0f} s")
    limits = {name: pair[1 if dry else 0] for name, pair in LIMITS.items()}
    results: dict = {"mode": "dry-run" if dry else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
        runner.run("environment", [sys.executable, "-m", "gpucheck.environment", "probe",
                                   str(scratch / "env.json"), str(WHEELS / "MANIFEST.json")],
                   limits["environment"])
        results["environment"] = _read(scratch / "env.json")
        env = results["environment"] or {}
        if env.get("python") and not env["python"].startswith(env["expected_python"] + "."):
            runner.say(f"   note: Python {env['python']}, the wheels are for {env['expected_python']}")
        if not dry and not env.get("cuda"):
            # the GPU sizes on a CPU would take an hour and measure nothing of interest
            runner.steps.append(Step("cuda", "failed", 0.0, "no CUDA here: --dry-run runs the check on a CPU"))
            runner.say("   no CUDA here: stopping (--dry-run runs the check on a CPU)")
            return 1

        if installed():
            runner.say("== install: skipped (bentoml and infinity-emb import already)")
        else:
            site = scratch / "site"
            why = install(runner, site, limits["install"])
            if why:
                runner.say(f"   cannot install: {why}")
                results["install_error"] = why
            runner.env["PYTHONPATH"] = base_env(dry, site)["PYTHONPATH"]

        preflight = runner.run("preflight", [sys.executable, "-m", "gpucheck.environment", "preflight",
                                             str(scratch / "preflight.json")], limits["preflight"])
        results["imports"] = _read(scratch / "preflight.json")
        if preflight.status == "ok":
            runner.run("pytest", [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu",
                                  "-p", "no:cacheprovider", "-rA", f"--junitxml={scratch / 'junit.xml'}"],
                       limits["pytest"], output=out / "pytest.txt")
            results["tests"] = junit(scratch / "junit.xml")
        runner.run("matmul", [sys.executable, "-m", "gpucheck.rates", str(scratch / "matmul.json"),
                              *(["--dry-run"] if dry else [])], limits["matmul"])
        results["matmul"] = _read(scratch / "matmul.json")
        if preflight.status == "ok":
            runner.run("throughput", [sys.executable, "-m", "gpucheck.throughput",
                                      str(scratch / "throughput.json"), str(scratch),
                                      *(["--dry-run"] if dry else [])], limits["throughput"])
            results["throughput"] = _read(scratch / "throughput.json")
    finally:
        runner.end_leftovers()
        results["steps"] = [vars(step) for step in runner.steps]
        results["seconds"] = time.monotonic() - began
        _server_log_tail(runner, scratch / "throughput-server.log")
        summary.write(out, results)
        runner.say(f"gpu-check: {time.monotonic() - began:.0f} s; wrote {', '.join(sorted(p.name for p in out.iterdir()))}")
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(step.status == "ok" for step in runner.steps) else 1


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _server_log_tail(runner: Runner, path: Path, lines: int = 60) -> None:
    if path.exists():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        runner.say(f"-- last {len(tail)} lines of the throughput server's log:\n" + "\n".join(tail))


if __name__ == "__main__":
    sys.exit(main())
