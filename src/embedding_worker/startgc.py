"""The cyclic garbage collector off while a serving process starts, then on, with what the start
made frozen.

A start imports ~1,500 modules and makes hundreds of thousands of objects, almost none of them
garbage, and the collector keeps walking them: measured with `gc.callbacks`, its ~250 passes took
0.17 s of the 1.6 s that importing the core and the service takes; paused, that import takes
0.15 s less (docs/performance.md). Frozen (`gc.freeze`), the start's objects are not walked by
later collections either; the few cycles a start leaves (a few thousand objects, +2 MB idle RSS)
stay, which is the price.
"""

from __future__ import annotations

import gc


def pause() -> None:
    """As a serving mode begins."""
    gc.disable()


def resume() -> None:
    """Once the mode has imported what it serves with, before it serves."""
    gc.freeze()
    gc.enable()
