"""Reference libraries whose pins clash with the service's, run in a child process beside it.

sentence-transformers 5 (its SparseEncoder) is installed without dependencies into a directory
of its own, once per machine (pytest's cache), and put first on the child's path; the child
uses this environment's torch and transformers, which that release supports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SENTENCE_TRANSFORMERS_5 = "sentence-transformers==5.7.0"


def installed(cache_dir: Path, requirement: str) -> Path:
    target = cache_dir / requirement.replace("=", "-")
    if not (target / ".complete").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), requirement], check=True)
        (target / ".complete").write_text(requirement)
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
