"""The runtimes the lean CPU engine runs a model's ONNX graph on, and which one (and in which
precision) a model gets on this CPU.

- ONNX Runtime, fp32: everywhere; the fused export (`onnx_export`).
- OpenVINO, reading the same ONNX file: bf16 on the CPU's matrix units (AMX), where
  `INFERENCE_PRECISION_HINT=bf16` makes it run bf16 kernels; on a CPU without native bf16 the hint
  is ignored (it runs f32), so bf16 is chosen only where the CPU has it.

- torch (`TorchSession`), only for models of outputs beyond one dense vector (SPLADE, BGE-M3,
  ColBERT) where torch serves (a GPU, BACKEND=torch): infinity has no such outputs, so the lean
  engine runs around torch's forward pass instead of an ONNX graph's.

docs/performance.md has the measurements behind the choice (`bench/runtimes.py`).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ONNXRUNTIME, OPENVINO, TORCH = "onnxruntime", "openvino", "torch"
FP32, BF16, FP16 = "float32", "bfloat16", "float16"
# The /proc/cpuinfo flag of AMX's bf16 tiles (Sapphire Rapids on). AVX-512 BF16 alone (Cooper
# Lake, Zen 4), which OpenVINO also uses for bf16, was not measured: fp32 there.
AMX_BF16 = "amx_bf16"
# OpenVINO's form of an export, weights in fp16, beside model.onnx (`onnx_export`): bf16 reads it
OPENVINO_IR = "openvino_model.xml"


@functools.cache  # read once per process, whatever the number of models
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (the first processor's; they are the same on every core)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name(path: str = "/proc/cpuinfo") -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


@functools.cache
def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def runtime_version(runtime: str) -> str:
    from importlib.metadata import version

    return f"{runtime} {version(runtime)}"


@dataclass(frozen=True)
class Choice:
    """Where and how a model runs, and why (logged at start-up)."""

    runtime: str
    precision: str
    reason: str
    device: str = "cpu"  # torch's (cuda on a GPU); the ONNX runtimes run on the CPU


def choose(dtype: str, flags: frozenset[str], openvino: bool) -> Choice:
    """The runtime and precision for a model asked for in `dtype` (auto, float32, bfloat16) on a
    CPU with `flags`. bf16 only where the CPU has AMX: its one measured gain (docs/performance.md).
    A float32 choice for `bf16` means the lean engine does not serve it here (torch does)."""
    amx = AMX_BF16 in flags
    if dtype == FP32:
        return Choice(ONNXRUNTIME, FP32, "DTYPES asks for float32")
    if not amx:
        why = "the CPU has no AMX (amx_bf16)"
        if dtype == BF16:
            why += ": bf16 would be emulated"
        return Choice(ONNXRUNTIME, FP32, why)
    if not openvino:
        return Choice(ONNXRUNTIME, FP32, "the CPU has AMX but openvino is not installed")
    return Choice(OPENVINO, BF16, "the CPU has AMX (amx_bf16): bf16 on its matrix units")


def for_this_cpu(dtype: str) -> Choice:
    """`choose` on this machine's CPU and installed runtimes."""
    return choose(dtype, cpu_flags(), openvino_installed())


class Session(Protocol):
    inputs: set[str]

    def shape(self, rows: int, width: int, window: int) -> tuple[int, int]:
        """The (rows, width) to pad a batch of `rows` x `width` tokens to, at most `window` wide:
        the caller slices the padding off the output."""

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's first output for `feed` (a new array: the caller may keep it)."""


# Rows are padded to one of these (two steps an octave: at most a third of a batch is padding).
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucketed(rows: int, width: int, window: int) -> tuple[int, int]:
    """`rows` and `width` rounded up to few distinct shapes: OpenVINO's CPU plugin compiles and
    keeps kernels for every input shape it meets, so a server's mix of batch sizes and lengths
    grew its memory past a gigabyte and on (docs/performance.md has the numbers). Widths go up in
    steps of an eighth of their power of two (16 at least), never past the window."""
    padded_rows = next((b for b in ROW_BUCKETS if b >= rows), rows)
    step = max(16, (1 << (width - 1).bit_length()) // 8)
    return padded_rows, min(-(-width // step) * step, max(window, width))


class OrtSession:
    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0].name  # last_hidden_state or logits

    def shape(self, rows: int, width: int, window: int) -> tuple[int, int]:
        return rows, width  # ONNX Runtime runs any shape as fast: padding would only cost

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feed)[0]


class OpenVinoSession:
    """OpenVINO's CPU plugin, compiled for `precision` at each start (~0.3 s for MiniLM): bf16 from
    the export's OpenVINO form where there is one (half the weights' memory), else, and f32 always,
    from the ONNX file. Its CACHE_DIR is not used: with an f32 and a bf16 compile of one model in
    one process it corrupted memory (docs/performance.md)."""

    def __init__(self, path: Path, precision: str, threads: int = 0):
        import openvino as ov

        if precision == BF16 and (path.parent / OPENVINO_IR).is_file():
            path = path.parent / OPENVINO_IR
        self.source = path

        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == BF16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",  # one stream on every core, as ONNX Runtime runs
            **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
        }
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.inputs = {name for port in self.compiled.inputs for name in port.get_names()}
        self.request = self.compiled.create_infer_request()

    def shape(self, rows: int, width: int, window: int) -> tuple[int, int]:
        return bucketed(rows, width, window)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        # the request's output buffer is reused by the next inference: a copy leaves it free
        return np.array(self.request.infer(feed)[0], copy=True)


class TorchSession:
    """The model's own weights on torch (transformers' Auto classes), for models of outputs
    beyond one dense vector where torch serves (a GPU, BACKEND=torch): the same engine around
    it, so the same numbers. `task`: "fill-mask" (SPLADE: the logits) or "feature-extraction"
    (the last hidden states)."""

    def __init__(self, model_dir: Path, task: str, choice: Choice, threads: int = 0):
        import inspect

        import torch

        if threads:
            torch.set_num_threads(threads)
        import transformers
        from transformers import AutoModel, AutoModelForMaskedLM

        self.torch, self.device = torch, torch.device(choice.device)
        auto = AutoModelForMaskedLM if task == "fill-mask" else AutoModel
        dtype = {FP32: torch.float32, BF16: torch.bfloat16, FP16: torch.float16}[choice.precision]
        # transformers 4.56 renamed torch_dtype to dtype (the old name warns)
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        named = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self.model = auto.from_pretrained(str(model_dir), **{named: dtype}).to(self.device).eval()
        accepted = inspect.signature(self.model.forward).parameters
        self.inputs = {name for name in ("input_ids", "attention_mask", "token_type_ids")
                       if name in accepted}

    def shape(self, rows: int, width: int, window: int) -> tuple[int, int]:
        return rows, width

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            tensors = {name: torch.from_numpy(value).to(self.device) for name, value in feed.items()
                       if name in self.inputs}
            out = self.model(**tensors)
            first = out.logits if hasattr(out, "logits") else out.last_hidden_state
            return first.float().cpu().numpy()


def open_session(path: Path, choice: Choice, model_dir: Path | None = None, task: str = "",
                 threads: int = 0) -> Session:
    """`path`: the ONNX file; torch reads `model_dir` instead. `threads`: 0 for the runtime's
    own choice (every core)."""
    if choice.runtime == TORCH:
        assert model_dir is not None
        return TorchSession(model_dir, task, choice, threads)
    if choice.runtime == OPENVINO:
        return OpenVinoSession(path, choice.precision, threads)
    return OrtSession(path, threads)
