"""Model-fault containment: what infinity's batch loop does not do for us.

infinity runs each model in three threads (pre-process, forward, post-process). An exception in any
of them kills that thread: every later request then waits forever. `guard_stages` wraps the three
stages so that a failing batch is re-run item by item and only the items that fail get a `Fault`
result (their requests answer 500, every other request in the batch gets its result), and each
finished batch beats the model's `Heartbeat`. `compat.install_stages` puts the wrapped stages on
the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..observability import metrics
from .base import Fault, Heartbeat

logger = logging.getLogger("embedding_worker")

Stage = Callable[[Any], Any]


class _Stage:
    """What travels between the wrapped stages: the batch's items and the stage output, or None
    once a stage failed (then the last stage redoes the items one by one)."""

    __slots__ = ("items", "value")

    def __init__(self, items: list[Any], value: Any):
        self.items = items
        self.value = value


class FaultGuard:
    """The containment state of one model: its heartbeat and the latest fault's reason."""

    def __init__(self, name: str, heartbeat: Heartbeat):
        self.name = name
        self.heartbeat = heartbeat
        self.last_fault = "the model returned NaN"

    def guard_stages(self, pre: Stage, core: Stage, post: Stage) -> tuple[Stage, Stage, Stage]:
        """The three stages, wrapped (see the module's docstring)."""

        def one(item: Any) -> Any:
            try:
                return post(core(pre([item])))[0]
            except Exception as exc:  # noqa: BLE001 - any model error fails only this item
                logger.warning("model %s failed on one item: %s", self.name, exc)
                fault = Fault(exc)
                self.last_fault = fault.error
                return fault

        def guarded(stage: Stage) -> Callable[[_Stage], _Stage]:
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

        def encode_post(batch: _Stage) -> list[Any]:
            try:
                done = guarded(post)(batch)
                return done.value if done.value is not None else [one(i) for i in batch.items]
            finally:
                self.heartbeat.beat()
                metrics.batch_size(self.name, len(batch.items))

        return encode_pre, guarded(core), encode_post

