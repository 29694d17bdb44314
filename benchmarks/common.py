"""Side-by-side timing (the two sides alternate in one process, so machine noise hits both), and the
paired comparison of a variant with its partner over seeds (a study config's NAME and NAME<suffix>)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(a: Callable[[], object], b: Callable[[], object], *, repeats: int = 15, warmup: int = 3):
    """Median seconds of `a` and of `b`, measured alternately, and the median of the per-round ratios b/a.
    Freed memory stays in the process, as `pas latency` times (`pas.latency.keep_freed_memory`)."""
    from pas.latency import keep_freed_memory
    keep_freed_memory()
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


def by_seed(frame, method: str, model: str):
    """top-1 of one row of a results table per seed."""
    rows = frame[(frame["method"] == method) & (frame["model"] == model)]
    return rows.set_index("seed")["top1"]


def interval(diffs: list[float]) -> str:
    """'mean [low, high] verdict' of paired differences (95% Student t)."""
    from pas.evidence import interval_verdict, paired_interval
    stats = paired_interval(diffs)
    low, high = stats["ci_low"], stats["ci_high"]
    text = f"{stats['diff_mean']:+.2f}" + ("" if low is None else f" [{low:+.2f}, {high:+.2f}]")
    return f"{text} {interval_verdict(low, high)}"


def partner_comparison(frame, suffix: str, labels: tuple[str, str], study: str):
    """Every PaS variant NAME of a results table with a partner NAME<suffix> (one search setting
    changed, same target, same pretrained backbone per seed): per target, each one's top-1 (mean over
    the seeds), the paired difference partner - NAME with its 95% t interval and verdict, each one's
    difference to the uniform baseline at NAME's target, the share of the full MACs the landing moved.
    ``labels``: the names of the two settings. Returns the table and every pair's difference."""
    import pandas as pd
    mine, theirs = labels
    pas = frame[frame["method"] == "pas"]
    models = set(pas["model"])
    names = [n for n in dict.fromkeys(pas["model"]) if not n.endswith(suffix) and f"{n}{suffix}" in models]
    if not names:
        raise SystemExit(f"no PaS variant NAME with a NAME{suffix} partner in the table: run {study}")
    cells, pooled = [], []
    for name in names:
        partner = f"{name}{suffix}"
        base, other = by_seed(frame, "pas", name), by_seed(frame, "pas", partner)
        uniform = by_seed(frame, "uniform", f"uniform@{name}")
        seeds = base.index.intersection(other.index)
        diffs = (other[seeds] - base[seeds]).tolist()
        pooled += diffs
        moved = {m: frame.loc[(frame["method"] == "pas") & (frame["model"] == m), "landing_moved_share"].mean()
                 for m in (name, partner)}
        vs_uniform = []
        for top1 in (base, other):
            common = top1.index.intersection(uniform.index)
            vs_uniform.append(interval((top1[common] - uniform[common]).tolist()) if len(common) else "")
        cells.append([name, str(len(seeds)), f"{base[seeds].mean():.2f}", f"{other[seeds].mean():.2f}",
                      interval(diffs), vs_uniform[0], vs_uniform[1],
                      f"{100 * moved[name]:.1f} / {100 * moved[partner]:.1f}"])
    table = pd.DataFrame(cells, columns=["variant", "seeds", f"{mine} top-1", f"{theirs} top-1",
                                         f"{theirs} − {mine} (95%)", f"{mine} − uniform", f"{theirs} − uniform",
                                         f"landing moved % ({mine} / {theirs})"])
    return table, pooled


def partner_main(argv, doc: str, compare, labels: tuple[str, str], align: str):
    """The command line of a partner study: read the table, print ``compare``'s table and the pooled line."""
    import argparse

    from pas.tables import markdown_text, read_table
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="the run's results/tables/main.csv")
    args = p.parse_args(argv)
    table, pooled = compare(read_table(args.table))
    print(markdown_text(table, align))
    print(f"\nAll targets pooled ({len(pooled)} pairs): {labels[1]} − {labels[0]} {interval(pooled)}")
    return table
