"""The ONNX plan of a model for the ONNX Runtime engine (BACKEND=auto on a CPU, or optimum),
and its export, made once per model.

`prepare` resolves a model, reads how it pools, its window and whether it normalises (what
`engine.ort` must do around the bare transformer), refuses what the ONNX path cannot serve with
the reason, and exports it into a cache unless the model ships its own `.onnx` file. The export
needs torch and optimum, so it runs in a child process (`python -m
embedding_worker.engine.onnx_export`): the serving process never imports them. Tests hold the
result to torch's numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ConfigError
from . import colbert, model_config
from .m3 import HEADS as M3_HEADS
from .m3 import HEADS_FILE as M3_HEADS_FILE

logger = logging.getLogger("embedding_worker")

# What a model's files say of it (configs, tokenizer, BGE-M3's heads, Stanford ColBERT's
# metadata); with its torch weights, what torch needs of a model of several outputs
# (`torch_plan`); with its shipped ONNX file, what the export or ONNX Runtime needs (the ONNX
# variants, O1-O4 and quantised, and other frameworks' weights are left on the hub).
DESCRIBING_FILES = ["*.json", "*.txt", "*.model", *M3_HEADS, colbert.STANFORD_METADATA]
TORCH_FILES = [*DESCRIBING_FILES, "*.safetensors", "pytorch_model.bin"]
HUB_FILES = [*TORCH_FILES, "onnx/model.onnx", "onnx/model.onnx_data"]
# sentence-transformers modules an ONNX export of the transformer alone reproduces (with
# engine.ort's pooling and normalisation); any other module (Dense, ...) would be lost.
KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}
# Architectures whose export is fused by ONNX Runtime's transformer optimizer (checked against
# torch by the tests); others are served as exported.
FUSED_MODEL_TYPES = {"bert"}
EXPORT_FORMAT = "fused-2-external-ov1"  # part of the cache key: bump when the export step changes
INSTALL_HINT = 'pip install "infinity-emb[torch,optimum]==0.0.78"'


@dataclass(frozen=True)
class OnnxPlan:
    """How ONNX Runtime serves one model: a directory with its `.onnx` file, and what to do
    around the transformer."""

    directory: str
    # "mean", "cls" or "last"; cross-encoders: "auto" (the logit is the score); SPLADE:
    # "splade-max" or "splade-sum" (log(1 + ReLU(logits)) pooled over the text's tokens);
    # ColBERT: "colbert" (no pooling: a vector per token, `engine.colbert`)
    pooling: str
    window: int | None  # sentence-transformers' max_seq_length, when the model has one
    normalizes: bool = False  # its sentence-transformers modules end in Normalize
    m3: bool = False  # BGE-M3's heads beside (`engine.m3`): sparse and multi-vectors too
    colbert: bool = False  # a ColBERT model: its projection and settings beside (`engine.colbert`)
    model_dir: str = ""  # the model's own files (its tokenizer; the weights torch reads)

    @property
    def splade(self) -> bool:
        return self.pooling.startswith("splade")

    @property
    def several_outputs(self) -> bool:
        """Outputs beyond one dense vector (SPLADE, BGE-M3, ColBERT): what infinity lacks."""
        return self.m3 or self.colbert or self.splade


def installed(*names: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in names)


def onnxruntime_installed() -> bool:
    """What serving needs (the export needs optimum besides, `require_exporter`)."""
    return installed("onnxruntime", "tokenizers")


def require_onnxruntime() -> None:
    if not onnxruntime_installed():
        raise ConfigError(f"BACKEND=optimum needs ONNX Runtime: {INSTALL_HINT}")


def require_exporter(source: str) -> None:
    if not installed("optimum", "torch"):
        raise ConfigError(f"{source} ships no ONNX file and exporting one needs torch and "
                          f"optimum: {INSTALL_HINT}, or export it ahead of time "
                          f"(embedding-worker download --onnx)")


def prepare(source: str, cache_root: str, found_in: tuple[str, ...] = ()) -> OnnxPlan:
    """Resolve `source` to a local directory, read its pooling and window, and export it to ONNX
    under `cache_root` unless it ships a `.onnx` file or an export of it is in `cache_root` or
    one of `found_in` (read only: the image's). Blocking (the export takes seconds)."""
    model_dir = local_dir(source)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vision_config") or config.get("audio_config"):
        raise ConfigError(f"BACKEND=optimum serves text models only; {source} is an image or audio "
                          f"model: use BACKEND=torch")
    cross_encoder = _cross_encoder(config)
    if cross_encoder and len(config.get("id2label") or {"0": ""}) > 1:
        raise ConfigError(f"BACKEND=optimum serves embedders and rerankers; {source} is a "
                          f"classifier: use BACKEND=torch")
    plan = _read(model_dir, config, source, cross_encoder)
    # BGE-M3's and ColBERT's heads are exported beside (to numpy), so such a model is exported
    # even if it ships ONNX
    if onnx_files(model_dir) and not (plan.m3 or plan.colbert):
        return plan
    task = ("text-classification" if cross_encoder else "fill-mask" if plan.splade
            else "feature-extraction+m3" if plan.m3 else "feature-extraction+colbert"
            if plan.colbert else "feature-extraction")
    directory = _export(model_dir, Path(cache_root), task, config.get("model_type", ""),
                        [Path(root) for root in found_in])
    return replace(plan, directory=str(directory))


def _read(model_dir: Path, config: dict, source: str, cross_encoder: bool = False) -> OnnxPlan:
    """What the model's files say: its pooling (or SPLADE's, or ColBERT's none), window, whether
    it normalises, whether it has BGE-M3's heads; its own directory as the plan's."""
    splade = _splade(model_dir, config)
    m3 = not cross_encoder and all((model_dir / head).is_file() for head in M3_HEADS)
    late = not cross_encoder and (colbert.is_stanford(config)
                                  or colbert.dense_modules(model_dir) is not None)
    pooling = "auto" if cross_encoder else splade or ("colbert" if late else
                                                       _pooling(model_dir, source))
    return OnnxPlan(str(model_dir), pooling, _st_window(model_dir),
                    normalizes=not (cross_encoder or late) and model_config.normalizes(str(model_dir)),
                    m3=m3, colbert=late, model_dir=str(model_dir))


def torch_plan(source: str, cache_root: str) -> OnnxPlan | None:
    """A model of outputs beyond one dense vector (SPLADE, BGE-M3, ColBERT), for the lean engine
    on torch (a GPU, or BACKEND=torch): its heads made beside as for an export, but no ONNX
    file; None for any other model (infinity serves those). Runs in the serving process, which
    has torch."""
    # a hub model's describing files first: the weights only for a model this path serves (not
    # its ONNX files, which torch does not read)
    model_dir = local_dir(source, DESCRIBING_FILES)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vision_config") or config.get("audio_config") or _cross_encoder(config):
        return None
    try:
        plan = _read(model_dir, config, source)
    except ConfigError:  # a model the lean engine cannot pool (infinity may)
        return None
    if not plan.several_outputs:
        return None
    model_dir = local_dir(source, TORCH_FILES)
    if not (plan.m3 or plan.colbert):  # SPLADE: nothing beside
        return plan
    kind = "m3" if plan.m3 else "colbert"
    target = Path(cache_root) / _cache_name(model_dir, f"heads+{kind}")
    if not target.is_dir():
        _made_in_place(target, lambda staging: (_m3_heads_beside if plan.m3 else
                                                _colbert_heads_beside)(model_dir, staging))
    return replace(plan, directory=str(target))


def _cross_encoder(config: dict) -> bool:
    return any("SequenceClassification" in a for a in config.get("architectures") or [])


def _made_in_place(target: Path, make: Callable[[Path], None]) -> None:
    """`make` a directory's files in a fresh directory beside `target`, renamed into place, so
    concurrent workers never read a half-made one (another worker's, if it got there first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".making-", dir=target.parent))
    try:
        make(staging)
        try:
            staging.rename(target)
        except OSError:  # another worker got there first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def local_dir(source: str, files: list[str] = HUB_FILES) -> Path:
    """A local model directory as given, or a hub model's local copy of `files`."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=files))  # honours HF_HUB_OFFLINE


def onnx_files(model_dir: Path) -> list[Path]:
    """The model's `.onnx` files, `model.onnx` first (then the others by name)."""
    found = sorted(model_dir.glob("**/*.onnx"))
    return sorted(found, key=lambda path: path.name != "model.onnx")


# sentence-transformers' SPLADE modules (its SparseEncoder format): the masked-LM transformer
# and the pooling of its logits
SPLADE_MODULES = {"MLMTransformer", "SpladePooling", "Transformer"}


def _splade(model_dir: Path, config: dict) -> str | None:
    """"splade-max" or "splade-sum" for a SPLADE model: sentence-transformers' SparseEncoder
    format (a SpladePooling module), or a plain `*ForMaskedLM` directory (SPLADE's own max
    pooling); None for any other model."""
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
        if "SpladePooling" not in kinds:
            return None
        extra = sorted(set(kinds) - SPLADE_MODULES)
        if extra:
            raise ConfigError(f"BACKEND=optimum: {model_dir} has sparse-encoder modules "
                              f"{', '.join(extra)} that the ONNX path leaves out")
        pooling_file = model_dir / kinds["SpladePooling"].get("path", "") / "config.json"
        found = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
        strategy = found.get("pooling_strategy", "max")
        activation = found.get("activation_function", "relu")
        if strategy not in ("max", "sum") or activation not in ("relu", None) or found.get(
                "embedding_dimension"):
            raise ConfigError(f"BACKEND=optimum: {model_dir} pools its logits by {strategy} of "
                              f"{activation}; the ONNX path does SPLADE's max or sum of "
                              f"log(1 + ReLU) only")
        return f"splade-{strategy}"
    if any(a.endswith("ForMaskedLM") for a in config.get("architectures") or []):
        return "splade-max"
    return None


def _pooling(model_dir: Path, source: str) -> str:
    """The pooling sentence-transformers applies (mean for a plain transformers model, as
    sentence-transformers itself falls back to)."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return "mean"
    modules = json.loads(modules_file.read_text())
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    extra = sorted(set(kinds) - KNOWN_MODULES)
    if extra:
        raise ConfigError(f"BACKEND=optimum: {source} has sentence-transformers modules "
                          f"{', '.join(extra)} that the ONNX path leaves out; use BACKEND=torch")
    modes = model_config.pooling_modes(str(model_dir)) or ["mean_tokens"]
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    if modes == ["lasttoken"]:
        return "last"
    raise ConfigError(f"BACKEND=optimum: {source} pools by {' + '.join(modes) or 'nothing'}; "
                      f"the ONNX path pools by mean, CLS or last token only: use BACKEND=torch")


def _st_window(model_dir: Path) -> int | None:
    config = model_dir / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def _fuse(onnx_file: Path, model_type: str) -> None:
    """ONNX Runtime's transformer fusions (one Attention op per layer, SkipLayerNorm, BiasGelu):
    the plain export materialises each layer's attention scores, 400 MB for 32 pairs of 512
    tokens. On the benchmark's reranker, in-process at c=16: 29.1 -> 31.8 pairs/s and peak RSS
    1772 -> 1484 MB (torch: 26.7, 1324 MB)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(onnx_file), model_type=model_type, opt_level=0).save_model_to_file(str(onnx_file))


def _export(model_dir: Path, cache_root: Path, task: str, model_type: str,
            found_in: list[Path]) -> Path:
    """Export once per model version: the cache key covers every file's name, size and mtime, the
    task, the exporter's and ONNX Runtime's versions and our export steps. Written beside the target and renamed into place, so
    concurrent workers never load a half-written export."""
    from importlib.metadata import version

    name = _cache_name(model_dir, f"{task} optimum-onnx {version('optimum-onnx')} "
                                  f"onnxruntime {version('onnxruntime')} {EXPORT_FORMAT}")
    for root in (cache_root, *found_in):
        if onnx_files(root / name):
            logger.info("ONNX export of %s found in %s", model_dir, root / name)
            return root / name
    target = cache_root / name
    require_exporter(str(model_dir))
    logger.info("exporting %s to ONNX (once, in a child process; cached in %s)", model_dir, target)

    def export_into(staging: Path) -> None:
        child = subprocess.run(
            [sys.executable, "-m", __name__, str(model_dir), str(staging), task, model_type],
            capture_output=True, text=True)
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"the ONNX export of {model_dir} failed: {last}")

    _made_in_place(target, export_into)
    return target


def _cache_name(model_dir: Path, what: str) -> str:
    """The model directory's name and a digest of `what` is made and of every file's name, size
    and mtime."""
    digest = hashlib.sha256(what.encode())
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = file.stat()
        # whole seconds: image layers (tar) keep no finer mtime, and an export made at build time
        # must be found again in the container
        digest.update(f"{file.relative_to(model_dir)} {stat.st_size} {int(stat.st_mtime)}\n".encode())
    return f"{model_dir.name}-{digest.hexdigest()[:16]}"


def export(model_dir: str, output: str, task: str, model_type: str) -> None:
    """The export itself (torch, optimum): what the child process runs."""
    from optimum.exporters.onnx import main_export

    task, _, extra = task.partition("+")
    main_export(model_dir, output=output, task=task, library_name="transformers", device="cpu",
                do_validation=False)
    if extra == "m3":
        _m3_heads_beside(Path(model_dir), Path(output))
    if extra == "colbert":
        _colbert_heads_beside(Path(model_dir), Path(output))
    onnx_file = Path(output) / "model.onnx"
    if model_type in FUSED_MODEL_TYPES:
        _fuse(onnx_file, model_type)
    _weights_beside(onnx_file)
    _openvino_beside(onnx_file)


def _m3_heads_beside(model_dir: Path, output: Path) -> None:
    """BGE-M3's heads (torch state dicts) as one numpy file, which serving reads without torch."""
    import numpy as np
    import torch

    heads = {}
    for head in M3_HEADS:
        state = torch.load(model_dir / head, map_location="cpu", weights_only=True)
        name = head.removesuffix(".pt")
        heads[f"{name}.weight"] = state["weight"].float().numpy()
        heads[f"{name}.bias"] = state["bias"].float().numpy()
    np.savez(output / M3_HEADS_FILE, **heads)


def _colbert_heads_beside(model_dir: Path, output: Path) -> None:
    """A ColBERT model's projection(s) as one numpy file (`i.weight`, `i.bias`), and the
    settings PyLate would read, which serving reads without torch or the model's directory."""
    import numpy as np
    import torch

    stanford = colbert.is_stanford(json.loads((model_dir / "config.json").read_text()))

    def state_of(directory: Path) -> dict:
        if (directory / "model.safetensors").is_file():
            from safetensors.torch import load_file

            return load_file(str(directory / "model.safetensors"))
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)

    heads = {}
    if stanford:
        heads["0.weight"] = state_of(model_dir)["linear.weight"].float().numpy()
        layers = 1
    else:
        paths = colbert.dense_modules(model_dir) or []
        for i, path in enumerate(paths):
            state = state_of(model_dir / path)
            heads[f"{i}.weight"] = state["linear.weight"].float().numpy()
            if "linear.bias" in state:
                heads[f"{i}.bias"] = state["linear.bias"].float().numpy()
        layers = len(paths)
    if not layers:
        raise ConfigError(f"{model_dir} is a ColBERT model without a projection")
    np.savez(output / colbert.HEADS_FILE, **heads)
    found = colbert.settings(model_dir, stanford)
    (output / colbert.SETTINGS_FILE).write_text(json.dumps({**found, "layers": layers}))


def _openvino_beside(onnx_file: Path) -> None:
    """OpenVINO's own form of the graph (`runtime.OPENVINO_IR`), its weights stored in half
    precision: what it serves in bf16 (`runtime.OpenVinoSession`). Read from the ONNX file it kept
    an fp32 copy of every weight beside the bf16 one: MiniLM's process 229 -> 118 MB after
    compiling (docs/performance.md). Made here, with the export, so an image has it built in."""
    import openvino as ov

    from .runtime import OPENVINO_IR

    model = ov.Core().read_model(str(onnx_file))
    ov.save_model(model, str(onnx_file.parent / OPENVINO_IR), compress_to_fp16=True)


def _weights_beside(onnx_file: Path) -> None:
    """The weights in a file of their own (`model.onnx_data`), which ONNX Runtime maps rather
    than copies: pages of the embedding table no text has touched stay on disk, and the parsed
    protobuf's copy is never made. The benchmark's two MiniLM-sized models at idle: 377 -> 285 MB
    of process (docs/performance.md)."""
    import onnx

    model = onnx.load(str(onnx_file))
    for stale in onnx_file.parent.glob("*.onnx_data"):
        stale.unlink()
    onnx.save_model(model, str(onnx_file), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=onnx_file.name + "_data")
    (onnx_file.parent / (onnx_file.name + "_data")).chmod(0o644)  # onnx writes it 0600


if __name__ == "__main__":
    export(*sys.argv[1:5])
