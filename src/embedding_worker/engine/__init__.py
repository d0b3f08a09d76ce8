"""The engine layer: the only package that imports infinity_emb, torch, onnxruntime or optimum.

`base` is the seam the core calls; `combined` is the engine the core gets: `ort` (ONNX Runtime,
`tokenizers`, numpy) for the text models it serves on a CPU, `infinity` for the rest. `compat`
holds every touch of infinity's internals; `onnx_export` (plans and the export, in a child
process), `fault_guard`, `grouping` and `model_config` serve both. Engine libraries are imported
lazily, when the engine loads, and only those the configuration needs.
"""

from __future__ import annotations

from ..config import Settings
from .base import Engine


def create_engine(settings: Settings) -> Engine:
    from .combined import CombinedEngine

    return CombinedEngine(settings)


def export_onnx(settings: Settings, cache_dir: str) -> dict[str, str]:
    """Make, ahead of time, the ONNX exports the engine would otherwise make at its first start
    on a CPU; served name -> export directory."""
    from .combined import CombinedEngine

    return CombinedEngine(settings).export_onnx(cache_dir)
