"""Read-ahead of the files a serve-mode start imports.

With the model stack gone, a start on a cold page cache waits on reading BentoML's ~1,400 small
module files one at a time (docs/performance.md). The first start that gets ready writes the list
of files the process has loaded beside the ONNX exports (`ONNX_CACHE`, which the deployment docs
keep on a volume); later starts hand that list to the kernel (`posix_fadvise(WILLNEED)`) from a
thread as soon as they begin, so the reads are under way before the imports ask for them.
`embedding-worker download --onnx DIR` (the image build) makes the list ahead, by a serve-mode
start in a child process, so that a fresh container has one (`BAKED_ONNX_CACHE`). A missing,
stale or foreign list costs nothing but the hint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import Settings, environment_with, onnx_cache_dirs

logger = logging.getLogger("embedding_worker")

READY_WAIT_S = 120.0  # a start slower than this (an export) writes no list; the next one will


def list_name() -> str:
    """One list per interpreter and environment: their files are what the list names."""
    key = hashlib.sha256(f"{sys.version} {sys.prefix}".encode()).hexdigest()[:12]
    return f"serve-start-files-{key}.txt"


def list_file(settings: Settings) -> Path:
    """Where this start writes its list: where new exports go."""
    return Path(onnx_cache_dirs(settings)[0]) / list_name()


def find_list(settings: Settings) -> Path | None:
    """The list a start reads: in ONNX_CACHE, else the one the image build made."""
    for directory in onnx_cache_dirs(settings):
        path = Path(directory) / list_name()
        if path.is_file():
            return path
    return None


def begin(settings: Settings) -> None:
    """Hint the kernel at the listed files, in a thread; nothing if there is no list yet."""
    path = find_list(settings)
    if hasattr(os, "posix_fadvise") and path is not None:
        threading.Thread(target=_hint, args=(path,), name="read-ahead", daemon=True).start()


def _hint(path: Path) -> None:
    for name in path.read_text().splitlines():
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def remember_when_ready(settings: Settings, ready: Callable[[], bool]) -> None:
    """Once `ready()`, write the files this process has loaded, unless a list is there."""
    if find_list(settings) is not None:
        return
    path = list_file(settings)

    def wait_and_write() -> None:
        deadline = time.monotonic() + READY_WAIT_S
        while not ready():
            if time.monotonic() > deadline:
                return
            time.sleep(0.25)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".{os.getpid()}.tmp")
            staging.write_text("\n".join(loaded_files()) + "\n")
            staging.replace(path)  # atomic: a concurrent start reads a whole list or none
        except OSError as exc:
            logger.info("no read-ahead list written to %s: %s", path, exc)

    threading.Thread(target=wait_and_write, name="read-ahead-list", daemon=True).start()


def loaded_files() -> list[str]:
    """The files behind the loaded modules: compiled bytecode where there is some, else the
    source or the extension module."""
    files = []
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source or not os.path.isfile(source):
            continue
        if source.endswith(".py"):
            cached = importlib.util.cache_from_source(source)
            source = cached if os.path.isfile(cached) else source
        files.append(source)
    return sorted(set(files))


def record_ahead(onnx_dir: str, timeout: float = READY_WAIT_S) -> Path | None:
    """Make the list into `onnx_dir` now: a serve-mode start of this configuration (offline) in a
    child process, stopped once it has written the list. None, saying why, if it could not:
    the first real start then writes one."""
    target = Path(onnx_dir) / list_name()
    if target.is_file():
        return target
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = environment_with(ONNX_CACHE=onnx_dir, BAKED_ONNX_CACHE="", HF_HUB_OFFLINE="1",
                           HOST="127.0.0.1", PORT=str(port))
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen([sys.executable, "-m", "embedding_worker", "serve"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not target.is_file() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.25)
        finally:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if target.is_file():
            return target
        log.seek(0)
        tail = log.read()[-1500:]
    print(f"no read-ahead list made (a serve-mode start did not get ready within {timeout:.0f} s"
          f" or exited); the first start will write one. Its log ended:\n{tail}", file=sys.stderr)
    return None
