"""How close can any one-process server come to issue 34's in-process limit at 64 x 1 text?

In process, no server: the 64 x 1 cell's texts (those `bench/limit.py` sends) on the model as the
server's engine opens it, batched three ways, each alone and then beside a thread that burns a
fixed amount of Python CPU per text done (what a server's event loop spends per one-text request:
HTTP, JSON, routing, the batcher), holding the GIL as an event loop does:

- `sorted`: all texts sorted by length, batches of 64 (the limit `bench/limit.py` reports);
- `window`: in arrival order, each 64 sorted among themselves, batches of 16 or 32 (the best a
  server can form from the 64 one-text requests it holds at once);
- `arrival`: arrival order, 11 a batch (what the server's batches averaged under wrk).

`--feeders 2` calls the model from two threads, as the server's batcher keeps two calls in flight
(one tokenises and pools while the other holds the model's lock); `sorted` stays one caller,
as `bench/limit.py` runs it, and is also shown with the feeders.

Rounds alternate the variants; items/s and the ratio to `sorted` are printed with the CPU.

    .venv/bin/python bench/ceiling.py [--rounds 2] [--burn 0,150,300,600]
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from limit import cell_items, engine_model  # noqa: E402
from run import bench_models  # noqa: E402
from runtimes import cpu  # noqa: E402
from versus import CELLS  # noqa: E402

REPEATS = 3  # passes over the cell's texts per measurement


class Burner:
    """A thread that owes `micros` of CPU (pure Python, GIL held) for every text done."""

    def __init__(self, micros: float):
        self.micros, self.done, self.stopped = micros, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        if micros:
            self.thread.start()

    def _run(self) -> None:
        paid = 0
        while not self.stopped:
            if paid < self.done:
                end = time.thread_time() + self.micros / 1e6
                while time.thread_time() < end:
                    pass
                paid += 1
            else:
                time.sleep(0.0003)

    def stop(self) -> None:
        self.stopped = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burn", default="0,150,300,600", help="us of CPU per text, comma-separated")
    parser.add_argument("--feeders", type=int, default=1, help="threads calling the model")
    args = parser.parse_args()
    models, corpus, tokens = bench_models()
    model = engine_model(models, "minilm")
    cell = next(c for c in CELLS if c["kind"] == "embed" and c["size"] == 1)
    items = cell_items(cell, corpus, tokens)
    length = dict(zip(items, model.count_tokens(items)))

    def by_length(texts: list[str], batch: int) -> list[list[str]]:
        texts = sorted(texts, key=length.__getitem__)
        return [texts[at:at + batch] for at in range(0, len(texts), batch)]

    def windows(batch: int) -> list[list[str]]:
        return [chunk for at in range(0, len(items), 64) for chunk in by_length(items[at:at + 64], batch)]

    variants = {"sorted, 64 a batch": by_length(items, 64), "window of 64, 16 a batch": windows(16),
                "window of 64, 32 a batch": windows(32),
                "arrival, 11 a batch": [items[at:at + 11] for at in range(0, len(items), 11)]}
    burns = [float(b) for b in args.burn.split(",")]

    def measure(chunks: list[list[str]], micros: float, feeders: int) -> float:
        for chunk in chunks:  # every shape met once before the clock
            model.embed_now(chunk)
        burner, work = Burner(micros), queue.SimpleQueue()
        for _ in range(REPEATS):
            for chunk in chunks:
                work.put(chunk)

        def feed() -> None:
            while True:
                try:
                    chunk = work.get_nowait()
                except queue.Empty:
                    return
                model.embed_now(chunk)
                burner.done += len(chunk)  # one thread at a time adds (the GIL); racy +1s are noise

        threads = [threading.Thread(target=feed) for _ in range(feeders)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rate = REPEATS * len(items) / (time.perf_counter() - start)
        burner.stop()
        return rate

    if args.feeders > 1:
        variants = {"sorted, 64 a batch": variants.pop("sorted, 64 a batch"),
                    f"sorted, 64 a batch, {args.feeders} feeders": by_length(items, 64), **variants}
    rows = []
    for round_ in range(args.rounds):
        for name, chunks in variants.items():
            for micros in burns if not name.startswith("sorted") else [0.0]:
                feeders = 1 if name == "sorted, 64 a batch" else args.feeders
                rows.append({"round": round_, "variant": name, "burn_us": micros,
                             "feeders": feeders, "items_per_s": measure(chunks, micros, feeders)})
                print(json.dumps(rows[-1]), flush=True)
    print("CPU:", cpu(), f"({model.info.runtime} {model.info.dtype})")
    print("| batches | side CPU per text | items/s by round | vs sorted |")
    print("| --- | ---: | --- | ---: |")
    limit = [r["items_per_s"] for r in rows if r["variant"] == "sorted, 64 a batch"]
    for name in variants:
        for micros in burns if not name.startswith("sorted") else [0.0]:
            got = [r["items_per_s"] for r in rows if r["variant"] == name and r["burn_us"] == micros]
            ratios = [g / s for g, s in zip(got, limit)]
            print(f"| {name} | {micros:.0f} us | {', '.join(f'{g:.1f}' for g in got)} "
                  f"| {min(ratios):.2f}-{max(ratios):.2f}x |")


if __name__ == "__main__":
    main()
