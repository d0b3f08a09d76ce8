"""What infinity's batch loop does not do for us: contain model faults and report progress.

infinity runs each model in three threads (pre-process, forward, post-process). An exception in any
of them kills that thread: every later request then waits forever. `EngineGuard` wraps the model's
three stages so that a failing batch is re-run item by item and only the items that fail get a
`Fault` result (their requests answer 500, every other request in the batch gets its result), and
it records a heartbeat per finished batch so that `/readyz` can tell a stalled loop from a busy one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from . import metrics

logger = logging.getLogger("embedding_worker")


class Fault(float):
    """Result of one item the model raised on. A NaN float, so that infinity's score arithmetic
    (sigmoid, sorting) passes it through unchanged; the core turns it into a 500."""

    error: str

    def __new__(cls, error: BaseException) -> Fault:
        fault = super().__new__(cls, math.nan)
        fault.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return fault


def is_fault(value: Any) -> bool:
    return isinstance(value, Fault) or (isinstance(value, float) and math.isnan(value))


class _Stage:
    """What travels between the wrapped stages: the batch's items and the stage output, or None
    once a stage failed (then the last stage redoes the items one by one)."""

    __slots__ = ("items", "value")

    def __init__(self, items: list[Any], value: Any):
        self.items = items
        self.value = value


class EngineGuard:
    def __init__(self, name: str, models: list[Any], stall_timeout: float):
        self.name = name
        self.stall_timeout = stall_timeout
        self.last_batch = time.monotonic()
        self.pending = 0  # engine calls awaiting results
        self.last_fault = "the model returned NaN"
        self.batches = 0  # batches finished, for tests and diagnostics
        self._unserved_since: float | None = None  # oldest work no finished batch came after
        for model in models:
            self._wrap(model)

    # --- progress (the event loop's thread; infinity's thread only writes `last_batch`) ---

    def submitted(self) -> None:
        self.pending += 1
        if self._unserved_since is None:
            self._unserved_since = time.monotonic()

    def finished(self, *, abandoned: bool = False) -> None:
        """`abandoned`: the caller went away; infinity skips its queued items, so no batch may
        follow, and that is no evidence of a stall. (A deadline that expired is evidence.)"""
        self.pending -= 1
        if abandoned and self.pending == 0:
            self._unserved_since = None

    def _beat(self, size: int) -> None:
        self.batches += 1
        self.last_batch = time.monotonic()
        metrics.batch_size(self.name, size)

    def stalled_for(self) -> float:
        """Seconds that submitted work has waited without any batch finishing (0 if none)."""
        since = self._unserved_since
        if since is None:
            return 0.0
        if self.last_batch >= since:  # a batch finished since: progress
            if self.pending == 0:
                self._unserved_since = None
                return 0.0
            self._unserved_since = since = self.last_batch
        return time.monotonic() - since

    @property
    def stalled(self) -> bool:
        return self.stalled_for() > self.stall_timeout

    # --- fault containment ---

    def _wrap(self, model: Any) -> None:
        pre, core, post = model.encode_pre, model.encode_core, model.encode_post

        def one(item: Any) -> Any:
            try:
                return post(core(pre([item])))[0]
            except Exception as exc:  # noqa: BLE001 - any model error fails only this item
                logger.warning("model %s failed on one item: %s", self.name, exc)
                fault = Fault(exc)
                self.last_fault = fault.error
                return fault

        def guarded(stage: Callable[[Any], Any]) -> Callable[[_Stage], _Stage]:
            def run(batch: _Stage) -> _Stage:
                if batch.value is None:
                    return batch
                try:
                    return _Stage(batch.items, stage(batch.value))
                except Exception as exc:  # noqa: BLE001
                    logger.warning("model %s failed on a batch of %d, retrying items one by one: %s",
                                   self.name, len(batch.items), exc)
                    return _Stage(batch.items, None)
            return run

        def encode_pre(items: list[Any]) -> _Stage:
            return guarded(pre)(_Stage(items, items))

        core_stage = guarded(core)

        def encode_post(batch: _Stage) -> list[Any]:
            try:
                done = guarded(post)(batch)
                return done.value if done.value is not None else [one(i) for i in batch.items]
            finally:
                self._beat(len(batch.items))

        model.encode_pre = encode_pre
        model.encode_core = core_stage
        model.encode_post = encode_post
