"""The engine layer: the only package that imports infinity_emb, torch, onnxruntime or optimum.

`base` is the seam the core calls; `infinity` implements it; `compat` holds every touch of
infinity's internals; `onnx_export`, `fault_guard` and `grouping` are what that implementation
adds to infinity. Engine libraries are imported lazily, when the engine loads.
"""

from __future__ import annotations

from ..config import Settings
from .base import Engine


def create_engine(settings: Settings) -> Engine:
    from .infinity import InfinityEngine

    return InfinityEngine(settings)


def export_onnx(settings: Settings, cache_dir: str) -> dict[str, str]:
    """Make, ahead of time, the ONNX exports the engine would otherwise make at its first start
    on a CPU; served name -> export directory."""
    from .infinity import InfinityEngine

    return InfinityEngine(settings).export_onnx(cache_dir)
