"""What a model's own files say beyond its weights: sentence-transformers' prompts and pooling."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("embedding_worker")

PROMPTS_FILE = "config_sentence_transformers.json"


def _find(source: str, filename: str) -> Path | None:
    """`filename` of a local model directory, or of a hub model already in the local cache (the
    engine has loaded it by now); None when the model has no such file."""
    local = Path(os.path.expanduser(source))
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=source, filename=filename)
    return Path(found) if isinstance(found, str) else None


def model_type(source: str) -> str | None:
    """config.json's `model_type` (a hub model's from the local cache: the engine has fetched its
    describing files by now); None without one."""
    path = _find(source, "config.json")
    try:
        return json.loads(path.read_text()).get("model_type") if path is not None else None
    except (OSError, ValueError):
        return None


def st_prompts(source: str) -> tuple[dict[str, str], str | None]:
    """The model's `prompts` and `default_prompt_name` (sentence-transformers' own config)."""
    path = _find(source, PROMPTS_FILE)
    if path is None:
        return {}, None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("%s of %s is unreadable, no prompts taken from it: %s", PROMPTS_FILE,
                       source, exc)
        return {}, None
    prompts = config.get("prompts") or {}
    prompts = {str(k): v for k, v in prompts.items() if isinstance(v, str)}
    default = config.get("default_prompt_name")
    return prompts, default if isinstance(default, str) and default in prompts else None


def served_prompts(source: str, overrides: tuple[tuple[str, str], ...]
                   ) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """The model's prompts with PROMPTS' over them, and its default prompt name."""
    prompts, default = st_prompts(source)
    prompts.update(overrides)
    return tuple(prompts.items()), default


# sentence-transformers' pooling modes -> the names TEI's /info uses
POOLING_NAMES = {"mean_tokens": "mean", "cls_token": "cls", "lasttoken": "last_token",
                 "max_tokens": "max"}


def _modules(source: str) -> list[dict]:
    """Its sentence-transformers modules (modules.json), [] without them."""
    modules_file = _find(source, "modules.json")
    if modules_file is None:
        return []
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, ValueError):
        return []
    return [m for m in modules if isinstance(m, dict) and isinstance(m.get("type"), str)]


def normalizes(source: str) -> bool:
    """Its sentence-transformers pipeline normalises its vectors itself (a Normalize module)."""
    return any(m["type"].endswith(".Normalize") for m in _modules(source))


def pooling_modes(source: str) -> list[str] | None:
    """The modes its sentence-transformers Pooling module has on (e.g. ["mean_tokens"]); None for
    a model without one (sentence-transformers then pools by mean)."""
    path = next((m.get("path") for m in _modules(source) if m["type"].endswith(".Pooling")), None)
    if not isinstance(path, str):
        return None
    config_file = _find(source, f"{path}/config.json".lstrip("/"))
    if config_file is None:
        return None
    config = json.loads(config_file.read_text())
    return sorted(k.removeprefix("pooling_mode_") for k, on in config.items()
                  if k.startswith("pooling_mode_") and on is True)


def pooling(source: str) -> str:
    """The pooling's name for /info: mean, cls, last_token, max, or a "+" of several."""
    modes = pooling_modes(source) or ["mean_tokens"]
    return "+".join(POOLING_NAMES.get(mode, mode) for mode in modes)
