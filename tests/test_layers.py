"""The layer boundaries of docs/architecture.md, read from the package's own imports (an AST walk):
engine libraries only in engine/, no transport in core/, data flowing down only, and infinity's
private attributes touched in engine/compat.py alone."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "embedding_worker"

ENGINE_LIBRARIES = {"infinity_emb", "torch", "onnxruntime", "openvino", "optimum", "transformers",
                    "sentence_transformers"}
TRANSPORT_LIBRARIES = {"fastapi", "starlette", "bentoml", "_bentoml_impl", "runpod", "uvicorn"}
# what each layer may not import of the package's own layers (data flows api -> core -> engine;
# the transports reach the engine only through the core)
FORBIDDEN_LAYERS = {
    "api": {"engine"},
    "core": {"api"},
    "engine": {"api", "core"},
    "observability": {"api", "core", "engine"},
}


def modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE)): ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def imported(relative: str, tree: ast.Module) -> set[str]:
    """Absolute dotted names of everything a module imports (relative imports resolved)."""
    package = ["embedding_worker", *Path(relative).parent.parts]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def layer(relative: str) -> str:
    parts = Path(relative).parts
    return parts[0] if len(parts) > 1 else relative


def test_the_walk_sees_imports():
    tree = ast.parse("import torch\nfrom ..core import errors\nfrom . import base\n")
    assert imported("engine/x.py", tree) == {
        "torch", "embedding_worker.core", "embedding_worker.core.errors", "embedding_worker.engine",
        "embedding_worker.engine.base"}


def test_engine_libraries_are_imported_in_engine_only():
    found = [(name, module) for name, tree in modules().items() if layer(name) != "engine"
             for module in imported(name, tree) if module.split(".")[0] in ENGINE_LIBRARIES]
    assert not found, f"engine libraries imported outside engine/: {found}"


def test_the_core_imports_no_transport():
    found = [(name, module) for name, tree in modules().items() if layer(name) == "core"
             for module in imported(name, tree) if module.split(".")[0] in TRANSPORT_LIBRARIES]
    assert not found, f"transport libraries imported in core/: {found}"


def test_layers_import_downwards_only():
    found = []
    for name, tree in modules().items():
        for module in imported(name, tree):
            parts = module.split(".")
            if parts[0] == "embedding_worker" and len(parts) > 1:
                if parts[1] in FORBIDDEN_LAYERS.get(layer(name), ()):
                    found.append((name, module))
    assert not found, f"imports against the flow api -> core -> engine: {found}"


def test_private_attributes_of_other_objects_are_touched_in_compat_only():
    found = []
    for name, tree in modules().items():
        if name == "engine/compat.py":
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append((name, node.lineno, node.attr))
    assert not found, f"private attributes read outside engine/compat.py: {found}"


def test_the_environment_is_read_in_config_only():
    found = [(name, node.lineno) for name, tree in modules().items() if name != "config.py"
             for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")]
    assert not found, f"environment read outside config.py: {found}"
