"""How well a latency table predicts deployed networks it was not fitted to, and how close a landing
on a latency budget comes to that budget when the network is measured.

For each case (backbone, input side, batch, runtime) the table is measured (`pas latency-table`'s
routine: every distinct layer over a grid of widths, calibrated on the full and a narrow network),
then, side by side in one process (`pas.latency.time_alternately`), the compact networks of
  - `--random` width settings drawn at random (every searched width uniform between 20% and 100%
    of its full width, on the allowed widths): non-uniform networks the calibration never saw;
  - the uniform and L1 baselines landed on budgets a third and two thirds of the way from the
    narrowest widths' predicted latency to the full network's.
Prints, per case, the prediction error (predicted / measured - 1) of the random networks (median
|error| and the worst), in ms and as shares of the full network measured beside them (the machine's
speed may drift between the table's measurement and this one: a share is free of that), and, per
landing, its measured share of the full network over the budget's share.

Goals: prediction within 10% at batch 1 and 32 on the CPU; measured latency within 5% of the
budget. Weights are random (latency depends on the architecture only); the L1 ranking of random
weights is as good a non-uniform width profile as any for this purpose.

    python -m benchmarks.latency_table [--repeats 10] [--paper]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pas.landing import WidthRule
from pas.latency import time_alternately
from pas.latency_table import network_case, measure_table
from pas.models import build
from pas.pruners import run_pruner
from pas.search import resolve_budget

MINI = dict(num_classes=10, in_channels=1, resolution=28)
CASES = [("repvgg_b0_mini", MINI, 1), ("repvgg_b0_mini", MINI, 32),
         ("mobilenetv2_mini_035", MINI, 1), ("mobilenetv2_mini_035", MINI, 32)]
PAPER = [("repvgg_b1", dict(num_classes=1000, in_channels=3, resolution=224), 1)]


def random_widths(arch, rule: WidthRule, rng: random.Random) -> list[int]:
    return rule.nearest(max(1, round(rng.uniform(0.2, 1.0) * f)) for f in arch.full_widths())


def run_case(backbone: str, shape: dict, batch: int, runtime: str, *, rounds: int, n_random: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build(backbone, **shape).eval()
    arch = model.arch
    t0 = time.perf_counter()
    table = measure_table(model, batch=batch, runtime=runtime, rounds=rounds, warmup=3)
    table_s = time.perf_counter() - t0
    rule, rng = WidthRule(arch), random.Random(seed)
    nets = {"full": arch.full_widths(), **{f"random{i}": random_widths(arch, rule, rng) for i in range(n_random)}}
    budgets = {}
    full, lowest = table.predict(arch, arch.full_widths()), table.predict(arch, rule.minimum())
    for third in (1, 2):  # a third and two thirds of the way from the narrowest widths to the full network
        budget = resolve_budget(f"{lowest + third / 3 * (full - lowest):.6f}ms", arch, latency_table=table)
        for method in ("uniform", "l1"):
            landing = run_pruner(method, model, budget.target, cost=budget.cost(arch), tolerance=0.02)
            nets[f"{method}@{third}/3"] = [int(m.sum()) for m in landing.masks]
            budgets[f"{method}@{third}/3"] = budget.target
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cases = [network_case(name, model, widths, batch=batch, runtime=runtime, device="cpu", threads=1,
                                   tmp=Path(tmp)) for name, widths in nets.items()]
            rows = time_alternately(cases, rounds=rounds, warmup=3)
    finally:
        torch.set_num_threads(previous)
    measured = {c.model: r["latency_ms"] for c, r in zip(cases, rows)}
    randoms = [n for n in nets if n.startswith("random")]
    errors = [table.predict(arch, nets[n]) / measured[n] - 1 for n in randoms]
    # the same as shares of the full network measured beside them: free of the machine's drift
    # between the table's measurement and this one
    shares = [table.predict(arch, nets[n]) / full / (measured[n] / measured["full"]) - 1 for n in randoms]
    landed = {n: (measured[n] / measured["full"]) / (budgets[n] / full) for n in budgets}
    return {"case": f"{backbone} {shape['resolution']}px b{batch} {runtime}", "table_s": table_s,
            "full_ms": table.data["full_ms"], "full_now_ms": measured["full"],
            "median_abs_error": statistics.median(abs(e) for e in errors), "worst_error": max(errors, key=abs),
            "median_abs_share_error": statistics.median(abs(e) for e in shares),
            "worst_share_error": max(shares, key=abs), "landed": landed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per point and per network")
    p.add_argument("--random", type=int, default=8, help="random width settings per case")
    p.add_argument("--runtimes", nargs="+", default=["pytorch", "onnxruntime"])
    p.add_argument("--paper", action="store_true", help="also RepVGG-B1 at 224 px, batch 1 (minutes)")
    args = p.parse_args()
    print("case | table s | full ms (table; now) | random, ms: median |err|, worst | random, share of full: median "
          "|err|, worst | measured share / budget share (uniform, l1 at 1/3, 2/3)")
    for backbone, shape, batch in CASES + (PAPER if args.paper else []):
        for runtime in args.runtimes:
            r = run_case(backbone, shape, batch, runtime, rounds=args.repeats, n_random=args.random, seed=0)
            landed = ", ".join(f"{n} {v:.3f}" for n, v in r["landed"].items())
            print(f"{r['case']} | {r['table_s']:.0f} | {r['full_ms']:.3f}; {r['full_now_ms']:.3f} | "
                  f"{r['median_abs_error']:.1%}, {r['worst_error']:+.1%} | {r['median_abs_share_error']:.1%}, "
                  f"{r['worst_share_error']:+.1%} | {landed}", flush=True)
    print("goals: |prediction error| <= 10% at batch 1 and 32 (CPU); measured latency within 5% of the budget")


if __name__ == "__main__":
    main()
