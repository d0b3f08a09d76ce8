"""A real `bentoml serve` process for end-to-end tests."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from embedding_worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range. A port from bind(0) is released before
    the server binds it, and in between `bentoml serve` reserves its circus controller's ports
    with bind(0) itself: CI once saw the controller handed our HTTP port ("Address already in use",
    the server never started). bind(0) never hands out a port below that range."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below {low}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any of the service's settings, plus `extra`.
    ONNX_CACHE stays: it says where exports are kept, not how the service behaves (the tests set
    it to a scratch directory)."""
    ours = {name.upper() for name in Settings.model_fields} - {"ONNX_CACHE"}
    env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
    env.update({"BENTOML_DO_NOT_TRACK": "true", **extra})
    return env


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """Until `url`/readyz answers 200; the log in the error if the process exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


class BentoServer:
    """Starts `bentoml serve` from the repo root with the given environment; logs to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, unset: tuple[str, ...] = (),
                 root: Path = ROOT):
        self.root = root  # another checkout's root serves that checkout's code (bench/ab.py)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {k: v for k, v in clean_env(**env).items() if k not in unset}
        if root != ROOT:
            self.env["PYTHONPATH"] = str(root / "src")
        self.proc: subprocess.Popen | None = None

    def launch(self) -> "BentoServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:InfinityEmbedding",
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.root, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def start(self, timeout: float = 180) -> "BentoServer":
        """Launch and wait until /readyz answers 200."""
        self.launch()
        try:
            wait_ready(self.url, self.proc, self.log_path, timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on `/metrics` (0 where it has not been counted yet)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return next((sample.value for family in text_string_to_metric_families(text)
                     for sample in family.samples
                     if sample.name == name and sample.labels == labels), 0.0)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
