"""Where the serving process spends its time: a py-spy-like stack sampler inside the process
(py-spy needs ptrace and a wheel of its own), with torch.profiler's CUDA kernel totals beside it.

`arm(folder)` (from hook/sitecustomize.py) starts a thread in every process of the server that
waits for `folder/start`; the process that runs infinity's engine (BentoML's worker, not its
arbiter) then samples every thread's Python stack each INTERVAL until `folder/stop`, and writes
`folder/samples-<pid>.json`: per thread role (the event loop, infinity's pre-process, forward and
post-process threads, the usage count's tokenizer) the samples by category, the innermost frames
most seen, and the role's CPU time from /proc (what it did in C included).

Limits, said in profile.txt too: a sample is taken when this thread holds the GIL, so code that
holds it long is seen late, and time inside C (the tokenizer's Rust, a CUDA sync) is booked to
the Python frame that called it; padding happens inside the tokenizer's Rust call, so it counts
as tokenisation.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

INTERVAL = 0.005
MAX_SECONDS = 60

# The thread a stack belongs to, by a frame found anywhere in it: (path fragment or None,
# function name or None) -> role; the first role that matches decides.
ROLES = (
    ((None, "_preprocess_batch"), "model: pre-process"), ((None, "_core_batch"), "model: forward"),
    ((None, "_postprocess_batch"), "model: post-process"),
    ((None, "count_tokens"), "token counting"), ((None, "tokenize_lengths"), "token counting"),
    (("asyncio/runners.py", None), "event loop"), ((None, "run_forever"), "event loop"),
)
# (path fragment, function name or None for any) -> category; the innermost frame that matches
# decides, so the order within one frame's candidates does not matter much.
RULES = (
    # uvloop runs the loop in C: a loop thread with no Python frame above asyncio.run is waiting
    # or doing the loop's own I/O (its CPU time, measured apart, tells which)
    (("asyncio/runners.py", "run"), "loop: C code (I/O or waiting)"),
    (("selectors.py", "select"), "idle"), (("threading.py", "wait"), "idle"),
    (("queue.py", "get"), "idle"), (("concurrent/futures/thread.py", "_worker"), "idle"),
    (("tokenization_utils", None), "tokenisation"), (("tokenizers", None), "tokenisation"),
    (("sentence_transformer", "tokenize"), "tokenisation"),
    (("embedding_worker/engine/grouping.py", None), "padding / grouping"),
    (("functional.py", "pad"), "padding / grouping"),
    (("torch/nn/modules", None), "forward: kernel launches"),
    (("transformers/models", None), "forward: kernel launches"),
    (("sentence_transformers/models", None), "forward: kernel launches"),
    ((None, "batch_to_device"), "device copies and sync"), ((None, "encode_core"), "device copies and sync"),
    ((None, "encode_post"), "post-process"),
    (("embedding_worker/core/encoding.py", None), "serialisation"),
    (("embedding_worker/core/schemas.py", None), "serialisation"), (("orjson", None), "serialisation"),
    (("embedding_worker/core", None), "core: validation, batching, pipeline"),
    (("starlette", None), "HTTP / ASGI"), (("fastapi", None), "HTTP / ASGI"),
    (("uvicorn", None), "HTTP / ASGI"), (("h11", None), "HTTP / ASGI"), (("httptools", None), "HTTP / ASGI"),
    (("bentoml", None), "HTTP / ASGI"), (("asyncio", None), "event loop overhead"),
    (("infinity_emb", None), "infinity: queues and scheduling"),
)


def classify(stack: list[tuple[str, str]]) -> tuple[str, str]:
    """(role, category) of one stack, given outermost first as (file name, function name)."""
    role = next((name for rule, name in ROLES if any(_matches(rule, frame) for frame in stack)), "other")
    for frame in reversed(stack):
        for rule, category in RULES:
            if _matches(rule, frame):
                return role, category
    return role, "other"


def _matches(rule: tuple[str | None, str | None], frame: tuple[str, str]) -> bool:
    (fragment, wanted), (filename, func) = rule, frame
    return (fragment is None or fragment in filename) and (wanted is None or wanted == func)


def _stack(frame) -> list[tuple[str, str]]:
    out = []
    while frame is not None:
        out.append((frame.f_code.co_filename.replace("\\", "/"), frame.f_code.co_name))
        frame = frame.f_back
    return out[::-1]


def thread_cpu() -> dict[int, float]:
    """CPU seconds so far of each of this process's threads, by native id (Linux /proc): what a
    thread did in C, which its Python stack does not show."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def sample(folder: Path, started: float) -> dict:
    me = threading.get_ident()
    counts: dict[str, Counter] = {}
    innermost: dict[str, Counter] = {}
    roles: dict[int, Counter] = {}  # thread ident -> its samples' roles
    cpu_before = thread_cpu()
    samples = 0
    while not (folder / "stop").exists() and time.perf_counter() - started < MAX_SECONDS:
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack = _stack(frame)
            role, category = classify(stack)
            counts.setdefault(role, Counter())[category] += 1
            roles.setdefault(ident, Counter())[role] += 1
            if category != "idle" and stack:
                path, func = stack[-1]
                innermost.setdefault(role, Counter())[f"{Path(path).parent.name}/{Path(path).name}:{func}"] += 1
        samples += 1
        time.sleep(INTERVAL)
    seconds = time.perf_counter() - started
    cpu_after, cpu = thread_cpu(), Counter()
    native_ids = {t.ident: t.native_id for t in threading.enumerate()}
    for ident, seen in roles.items():
        tid = native_ids.get(ident)
        if tid in cpu_after:
            cpu[seen.most_common(1)[0][0]] += cpu_after[tid] - cpu_before.get(tid, 0.0)
    own = threading.get_native_id()
    sampler = cpu_after.get(own, 0.0) - cpu_before.get(own, 0.0)
    process = sum(cpu_after.values()) - sum(cpu_before.values()) - sampler
    # threads Python does not know (torch's intra-op pool, the tokenizer's Rust pool)
    native = max(0.0, process - sum(cpu.values()))
    return {"samples": samples, "seconds": seconds, "threads": {r: dict(c) for r, c in counts.items()},
            "cpu_fraction": {role: s / seconds for role, s in cpu.items()},
            "native_cpu_fraction": native / seconds, "process_cpu_fraction": process / seconds,
            "sampler_cpu_fraction": sampler / seconds,
            "innermost": {r: c.most_common(8) for r, c in innermost.items()}}


class _Kernels:
    """torch.profiler's CUDA activity over the window (CUPTI records every thread's kernels)."""

    def __init__(self):
        self.profiler = None
        self.error = None
        try:
            import torch

            if torch.cuda.is_available():
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
            else:
                self.error = "no CUDA: no kernels to time"
        except Exception as exc:  # noqa: BLE001
            self.error = repr(exc)

    def finish(self) -> dict:
        if self.profiler is None:
            return {"error": self.error}
        try:
            self.profiler.__exit__(None, None, None)
            rows = [(e.key, e.self_device_time_total, e.count) for e in self.profiler.key_averages()
                    if e.self_device_time_total > 0]
        except Exception as exc:  # noqa: BLE001
            return {"error": repr(exc)}
        rows.sort(key=lambda row: -row[1])
        return {"device_us": sum(r[1] for r in rows), "top": rows[:12]}


def _run(folder: Path) -> None:
    while not (folder / "start").exists():
        time.sleep(0.02)
    if "infinity_emb" not in sys.modules:
        return  # BentoML's arbiter: nothing of the engine runs here
    started = time.perf_counter()
    kernels = _Kernels()
    result = sample(folder, started)
    result.update(pid=os.getpid(), interval=INTERVAL, kernels=kernels.finish())
    (folder / f"samples-{os.getpid()}.json").write_text(json.dumps(result))


def arm(folder: str) -> None:
    threading.Thread(target=_run, args=(Path(folder),), name="gpu-check-sampler", daemon=True).start()
