"""Reference libraries whose pins clash with the service's, run in a child process beside it.

sentence-transformers 5 (its SparseEncoder) is installed without dependencies into a directory
of its own, once per machine (pytest's cache), and put first on the child's path; the child
uses this environment's torch and transformers, which that release supports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SENTENCE_TRANSFORMERS_5 = "sentence-transformers==5.7.0"
FLAG_EMBEDDING = "FlagEmbedding==1.4.2"
# PyLate with the sentence-transformers it pins (its index and training stacks are never imported
# by its encoding code, but its model card is: `WITHOUT_TRAINING_IMPORTS`)
PYLATE = "pylate==1.6.0 sentence-transformers==5.3.0"
# FlagEmbedding's package imports its training code, which imports these; its inference code
# (what the tests compare with) never calls them. `without_training_imports` stands in for them
# with empty modules rather than installing a dataset stack for nothing.
TRAINING_ONLY = ("datasets", "peft", "accelerate", "ir_datasets")
WITHOUT_TRAINING_IMPORTS = f"""
import importlib.abc, importlib.machinery, types
class _Empty(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {{}})
class _TrainingOnly(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {TRAINING_ONLY!r}:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        return _Empty(spec.name)
    def exec_module(self, module):
        module.__path__ = []
sys.meta_path.insert(0, _TrainingOnly())
"""


def installed(cache_dir: Path, requirement: str) -> Path:
    """`requirement`'s own files (one or several, by spaces) in a directory of their own
    (installed once: into a fresh directory, renamed into place, so an interrupted install is
    never taken for one)."""
    target = cache_dir / requirement.replace("=", "-").replace(" ", "+")
    if not target.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=cache_dir))
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                            str(staging), *requirement.split()], check=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def run(cache_dir: Path, requirement: str, script: str, **arguments) -> dict:
    """`script` in a child with `requirement` first on its path; it reads `ARGS` (a dict) and
    prints one JSON object."""
    path = installed(cache_dir, requirement)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    code = f"import json, sys\nARGS = json.loads(sys.argv[1])\n{script}"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
