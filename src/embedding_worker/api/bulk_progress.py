"""A bulk job's progress: rows done as the workers report them (a Ray actor counts), printed as a
line every few seconds with the rows per second and, where the input's size is known, what is
left and an estimate of the time it takes. Ray Data's own progress shows blocks and operators,
not a rate or an end; this is the job's one line for a person or a log."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


class Counter:
    """The rows done, added to by every worker (runs as a Ray actor: one count for the job)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def get(self) -> int:
        return self.rows


class Tally:
    """What a worker calls after each batch (`Embedder(progress=...)`): picklable, so it travels
    to the workers with the stage's other arguments."""

    def __init__(self, counter: Any):
        self.counter = counter

    def __call__(self, rows: int) -> None:
        self.counter.add.remote(rows)


def line(done: int, total: int | None, rate: float) -> str:
    """`12,288 of 20,000 rows (61 %), 257 rows/s, about 0:00:30 left`."""
    text = f"{done:,} rows" if total is None else \
        f"{done:,} of {total:,} rows ({min(100, 100 * done // max(total, 1))} %)"
    text += f", {rate:,.0f} rows/s"
    if total is not None and rate > 0 and done < total:
        left = round((total - done) / rate)
        text += f", about {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d} left"
    return text


class Reporter:
    """Prints `bulk: <line>` every `every` seconds while a job runs, and once at its end."""

    def __init__(self, counter: Any, total: int | None, every: float = 10.0,
                 out: TextIO = sys.stderr):
        self.counter, self.total, self.every, self.out = counter, total, every, out
        self.start = time.monotonic()
        self.first: tuple[float, int] | None = None  # when rows were first seen done, how many
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            import ray

            done, seconds = ray.get(self.counter.get.remote()), time.monotonic() - self.start
            print(f"bulk: done, {done:,} rows in {seconds:,.1f} s "
                  f"({done / max(seconds, 1e-9):,.0f} rows/s with the start)", file=self.out,
                  flush=True)

    def _print(self) -> None:
        import ray

        done, now = ray.get(self.counter.get.remote()), time.monotonic()
        if done and self.first is None:
            self.first = (now, done)
        # the rate since rows were first seen done: the workers' start is not counted in it
        rate = 0.0
        if self.first is not None and now > self.first[0]:
            rate = (done - self.first[1]) / (now - self.first[0])
        print(f"bulk: {line(done, self.total, rate)}", file=self.out, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._print()
