"""What the machine is, and whether the service's stack imports on it.

    python -m gpucheck.environment probe OUT.json [MANIFEST.json]   (torch and the stdlib only)
    python -m gpucheck.environment preflight OUT.json               (after the wheels' install)
"""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path



def probe(manifest: Path | None) -> dict:
    import torch

    info = {"python": platform.python_version(), "executable": sys.executable,
            "expected_python": "3.12",  # the wheels' (bench/gpu-wheels --python), as carried
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "cores": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    bf16=torch.cuda.is_bf16_supported(), cuda_runtime=torch.version.cuda)
    if manifest is not None and manifest.exists():
        carried = json.loads(manifest.read_text())
        info["expected_python"] = carried["python"]
        info["box_pins"] = box_pins(carried["from_the_box"], carried.get("kept_despite_pins", {}))
    return info


def box_pins(wanted: dict[str, dict[str, str]], kept: dict[str, str]) -> dict[str, list]:
    """The distributions the check takes from this machine: missing ones, and the pins of ours
    their versions break (the install is --no-deps, so nothing else says so); `kept` are known
    and why they are not carried."""
    from packaging.specifiers import SpecifierSet

    missing, broken = [], []
    for name, specs in sorted(wanted.items()):
        try:
            held = version(name)
        except PackageNotFoundError:
            missing.append(name)
            continue
        for requirer, spec in specs.items():
            if spec and not SpecifierSet(spec).contains(held, prereleases=True):
                known = f" (known: {kept[name]})" if name in kept else ""
                broken.append(f"{requirer} wants {name}{spec}, here {held}{known}")
    return {"missing": missing, "broken": broken}


def preflight() -> dict:
    """Import what the server and the tests import, and say where each came from (the wheels'
    target must shadow the machine's own transformers and sentence-transformers)."""
    import importlib

    found = {}
    for module in ("bentoml", "infinity_emb", "sentence_transformers", "transformers",
                   "tokenizers", "huggingface_hub", "numpy", "torch", "pytest",
                   "embedding_worker.engine.infinity", "embedding_worker.core.core"):
        loaded = importlib.import_module(module)
        found[module] = {"version": getattr(loaded, "__version__", None),
                         "from": str(Path(loaded.__file__).parent)}
    return found


def main() -> None:
    command, out = sys.argv[1], Path(sys.argv[2])
    result = probe(Path(sys.argv[3]) if len(sys.argv) > 3 else None) if command == "probe" else preflight()
    out.write_text(json.dumps(result, indent=1))
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
