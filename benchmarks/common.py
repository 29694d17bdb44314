"""Side-by-side timing: the two sides alternate in one process, so machine noise hits both."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(a: Callable[[], object], b: Callable[[], object], *, repeats: int = 15, warmup: int = 3):
    """Median seconds of `a` and of `b`, measured alternately, and the median of the per-round ratios b/a."""
    for _ in range(warmup):
        a(), b()
    ta, tb, ratios = [], [], []
    for i in range(repeats):
        order = (a, b) if i % 2 == 0 else (b, a)
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - t0
        ta.append(times[a])
        tb.append(times[b])
        ratios.append(times[b] / times[a])
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def verdict(value: float, goal: float, *, at_most: bool) -> str:
    ok = value <= goal if at_most else value >= goal
    return f"{'met' if ok else 'MISSED'} (goal {'<=' if at_most else '>='} {goal})"
