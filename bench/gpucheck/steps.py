"""Each step of the check is a subprocess with its own time limit inside one overall budget, so
that a hung step costs its limit, not the machine's lease."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# every process a step starts carries this in its environment: what a timed-out step leaves
# behind (servers run in their own sessions) is found by it and ended, nothing else
MARKER = "GPU_CHECK_RUN"
RESERVE_S = 20  # kept back from the budget for the summary


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok, failed, timed out, skipped
    seconds: float = 0.0
    note: str = ""


@dataclass
class Runner:
    log: Path
    budget_s: float
    env: dict[str, str]
    cwd: Path
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self):
        self.deadline = time.monotonic() + self.budget_s
        self.env = {**self.env, MARKER: uuid.uuid4().hex}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")

    def say(self, line: str) -> None:
        print(line, flush=True)
        with self.log.open("a") as log:
            log.write(line + "\n")

    def run(self, name: str, command: list[str], limit_s: float, output: Path | None = None,
            shown: str | None = None) -> Step:
        """Run `command`; its output goes to `output` (or the log). A step past its limit (or the
        budget's) gets SIGINT, so its servers stop in `finally`, then SIGKILL."""
        step = Step(name)
        self.steps.append(step)
        limit = min(limit_s, self.deadline - time.monotonic() - RESERVE_S)
        if limit < 10:
            step.status, step.note = "skipped", "no time left in the budget"
            self.say(f"== {name}: skipped (budget spent)")
            return step
        self.say(f"== {name} (limit {limit:.0f} s): {shown or ' '.join(command)}")
        began = time.monotonic()
        target = output or self.log
        with target.open("a" if target == self.log else "w") as sink:
            proc = subprocess.Popen(command, cwd=self.cwd, env=self.env,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(limit)
                step.status = "ok" if rc == 0 else "failed"
                step.note = "" if rc == 0 else f"exit code {rc}"
            except subprocess.TimeoutExpired:
                step.status, step.note = "timed out", f"stopped after {limit:.0f} s"
                self._stop(proc)
        self.end_leftovers()
        step.seconds = time.monotonic() - began
        self.say(f"== {name}: {step.status} in {step.seconds:.1f} s {step.note}".rstrip())
        return step

    def _stop(self, proc: subprocess.Popen) -> None:
        for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue

    def end_leftovers(self) -> None:
        """Kill processes that carry this run's marker (a timed-out step's servers)."""
        tag = f"{MARKER}={self.env[MARKER]}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                if not zombie and tag in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
                    self.say(f"   ended leftover process {entry.name}")
            except (OSError, IndexError):
                continue
