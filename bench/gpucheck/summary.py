"""The check's output files from its results: results.json (everything), summary.md (for people,
the bottleneck named) and profile.txt (the profiled cell in full)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

IDLE = {"idle"}


def write(out: Path, results: dict) -> None:
    """Write the three files; a rendering error costs that file only (results.json goes first,
    and a GPU run must bring back what it measured)."""
    peak = (results.get("matmul") or {}).get("flops_per_s")
    throughput = results.get("throughput") or {}
    for row in throughput.get("cells", []):
        row["fraction_of_matmul"] = row["flops_per_s"] / peak if peak else None
    profile = throughput.get("profile") or {}
    results["bottleneck"] = _rendered(lambda: bottleneck(profile, throughput.get("cells", [])))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "profile.txt").write_text(_rendered(lambda: profile_text(profile)))
    (out / "summary.md").write_text(_rendered(lambda: summary_md(results)))


def _rendered(render) -> str:
    try:
        return render()
    except Exception:  # noqa: BLE001
        return "could not render (the data is in results.json):\n" + traceback.format_exc()


def thread_shares(profile: dict) -> dict[str, dict[str, float]]:
    """Per thread role, each category's share of that role's samples (several threads of one
    role, e.g. two models' forward threads, add up)."""
    shares = {}
    for role, counts in (profile.get("threads") or {}).items():
        total = sum(counts.values())
        shares[role] = {cat: n / total for cat, n in sorted(counts.items(), key=lambda kv: -kv[1])}
    return shares


def bottleneck(profile: dict, cells: list[dict]) -> str:
    """What limits the profiled cell, by a plain rule: the GPU when kernels run most of the
    window (torch.profiler's kernel time, else NVML's utilisation in the same cell's unprofiled
    run); else the server thread that used the most CPU, and what its samples show it doing."""
    if not profile or "threads" not in profile:
        return "unknown: no profile (" + (profile.get("error") or "the step did not run") + ")"
    kernels = profile.get("kernels") or {}
    gpu = kernels["device_us"] / 1e6 / profile["seconds"] if kernels.get("device_us") else None
    cell = profile.get("cell") or {}
    same = [r for r in cells if all(r[k] == cell.get(k) for k in ("model", "tokens", "cell"))]
    if gpu is None and same and same[0].get("gpu_busy") is not None:
        gpu = same[0]["gpu_busy"]
    if gpu is not None and gpu >= 0.8:
        return f"the GPU: kernels ran {gpu:.0%} of the profiled window"
    gpu_text = f"GPU busy {gpu:.0%}" if gpu is not None else "GPU busy unknown"
    shares = {role: v for role, v in thread_shares(profile).items() if role != "other"}
    cpu = {role: f for role, f in (profile.get("cpu_fraction") or {}).items() if role in shares}
    if not shares:
        return gpu_text + "; no server thread was sampled"
    role = max(cpu, key=cpu.get) if cpu else max(
        shares, key=lambda r: 1 - sum(v for k, v in shares[r].items() if k in IDLE))
    top = next((k for k in shares[role] if k not in IDLE), "idle")
    used = f"used {cpu[role]:.0%} of a core" if role in cpu else "was the busiest"
    return (f"{gpu_text}; the host: the {role} thread {used}, most of its samples in {top} "
            f"({shares[role].get(top, 0):.0%})")


def profile_text(profile: dict) -> str:
    if not profile:
        return "no profile: the throughput step did not run or did not finish\n"
    if "threads" not in profile:
        return f"no profile: {profile.get('error')}\n"
    cell = profile.get("cell", {})
    lines = [f"profiled cell: {cell}",
             f"{profile['samples']} samples every {profile['interval'] * 1000:.0f} ms over "
             f"{profile['seconds']:.1f} s in process {profile['pid']} (BentoML's worker)",
             "Python stacks sampled in-process (gpucheck/sampler.py): time in C (the tokenizer's Rust,",
             "a CUDA sync) is booked to the Python frame that called it; padding happens inside the",
             "tokenizer's call, so it counts as tokenisation; a sample waits for the GIL.", ""]
    cpu = profile.get("cpu_fraction") or {}
    lines.append(f"the process used {profile.get('process_cpu_fraction', 0):.2f} cores, "
                 f"{profile.get('native_cpu_fraction', 0):.2f} of them in threads Python does not know "
                 "(torch's and the tokenizer's native pools), the sampler itself "
                 f"{profile.get('sampler_cpu_fraction', 0):.2f} more;")
    lines.append("per thread role, CPU (from /proc, C code included) and the samples by category:")
    for role, shares in thread_shares(profile).items():
        lines.append(f"[{role}] CPU {cpu[role]:.2f} cores" if role in cpu else f"[{role}]")
        lines += [f"  {share:6.1%}  {category}" for category, share in shares.items()]
        for frame, count in profile.get("innermost", {}).get(role, []):
            lines.append(f"      {count:6d}  {frame}")
    kernels = profile.get("kernels") or {}
    lines.append("")
    if kernels.get("top"):
        lines.append(f"CUDA kernels (torch.profiler): {kernels['device_us'] / 1e3:.0f} ms of device "
                     f"time in {profile['seconds']:.1f} s")
        lines += [f"  {us / 1e3:9.1f} ms  {calls:6d}x  {name[:90]}" for name, us, calls in kernels["top"]]
    else:
        lines.append(f"CUDA kernels: {kernels.get('error') or 'none recorded'}")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def summary_md(r: dict) -> str:
    env = r.get("environment") or {}
    lines = [f"# GPU check: {r['mode']}", "",
             f"{r['started']}; {r['seconds']:.0f} s in all. Python {env.get('python')}, torch "
             f"{env.get('torch')}, " + (f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, "
                                        f"capability {env.get('capability')}, bf16 {env.get('bf16')})"
                                        if env.get("cuda") else "no CUDA"), ""]
    if r["mode"] == "dry-run":
        lines += ["A dry run: the CPU and tiny models, to keep the script working; its numbers mean nothing.", ""]
    lines += ["**Bottleneck of the profiled cell:** " + r.get("bottleneck", "unknown"), "",
              "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['note']} |" for s in r.get("steps", [])]
    if r.get("install_error"):
        lines += ["", f"Install: {r['install_error']}"]
    pins = env.get("box_pins") or {}
    if pins.get("missing") or pins.get("broken"):
        lines += ["", f"Taken from the machine but missing: {pins.get('missing') or 'none'}; "
                      f"pins of ours its versions break: {pins.get('broken') or 'none'}"]
    tests = r.get("tests") or {}
    if tests:
        lines += ["", "## Tests (`pytest -m gpu tests/test_gpu.py`, full output in pytest.txt)", "",
                  "| test | outcome | measured |", "| --- | --- | --- |"]
        for name, t in tests.items():
            measured = ", ".join(f"{k} {_fmt(v, '.6f') if isinstance(v, float) else v}"
                                 for k, v in t["properties"].items())
            note = measured or t["reason"].replace("|", "/")[:120]
            lines.append(f"| {name} | {t['outcome']} | {note} |")
    matmul = r.get("matmul") or {}
    if matmul:
        lines += ["", f"## Matrix rate: {matmul['flops_per_s'] / 1e12:.1f} TFLOP/s ({matmul['dtype']} "
                      f"{matmul['n']}^3 on {matmul['device']}, mean of 10 after 3 warm-ups)"]
    throughput = r.get("throughput") or {}
    if throughput.get("cells"):
        lines += ["", f"## Through the server (BACKEND=torch, DTYPES=auto, BATCH_SIZES=32; "
                      f"{throughput['cell_seconds']:.0f} s cells; ready in {throughput['server_ready_s']:.1f} s)", "",
                  "Random-weight BERTs: " + "; ".join(f"{k} {v['layers']} layers x {v['hidden']}"
                                                      for k, v in throughput["models"].items())
                  + ". FLOPs per token: 2 x the non-embedding parameters + attention (gpucheck/rates.py).", "",
                  "| model | tokens | cell | c x texts | tokens/s | p50 ms | p99 ms | errors | GPU busy | TFLOP/s | of matmul |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in throughput["cells"]:
            lines.append(f"| {c['model']} | {c['tokens']} | {c['cell']} | {c['concurrency']} x "
                         f"{c['texts_per_request']} | {c['tokens_per_s']:.0f} | {c['p50_ms']:.1f} | "
                         f"{c['p99_ms']:.1f} | {c['errors']} | {_fmt(c['gpu_busy'], '.0%')} | "
                         f"{c['flops_per_s'] / 1e12:.2f} | {_fmt(c.get('fraction_of_matmul'), '.1%')} |")
        shares = thread_shares(throughput.get("profile") or {})
        if shares:
            lines += ["", "## Where the server's time goes (profiled cell; details in profile.txt)", ""]
            cpu = throughput["profile"].get("cpu_fraction") or {}
            for role, cats in shares.items():
                used = f" (CPU {cpu[role]:.2f} cores)" if role in cpu else ""
                lines.append(f"- {role}{used}: " + ", ".join(f"{k} {v:.0%}" for k, v in list(cats.items())[:5]))
    return "\n".join(lines) + "\n"
