"""How well a latency table predicts deployed networks it was not fitted to, and how close a landing
on a latency budget comes to that budget when the network is measured.

For each case (backbone, input side, batch, runtime) the table is measured (`pas latency-table`'s
routine: every distinct layer over a grid of widths, the calibration fitted to measured networks,
`--random` random networks and three uniform ones timed in the same loop to check it), then, side by
side in one process (`pas.latency.time_alternately`), the compact networks of
  - `--random` width settings drawn at random (every searched width uniform between 20% and 100%
    of its full width, on the allowed widths): non-uniform networks the calibration never saw;
  - the uniform and L1 baselines landed on budgets a third and two thirds of the way from the
    narrowest widths' predicted latency to the full network's.
Prints, per case, the prediction error (predicted / measured - 1) of the networks checked in the
table's own loop (no drift between them and the fitted ones) and, later, of the random networks
(median |error| and the worst), in ms and as shares of the full network measured beside them (the machine's
speed may drift between the table's measurement and this one: a share is free of that), for the
table's calibration fitted to networks and, from the same measurements, for the two-point one (one
scale for every layer, from the full and the 1/8 network), and, per landing, its measured share of
the full network over the budget's share.

Goals: prediction within 10% at batch 1 and 32 on the CPU; measured latency within 5% of the
budget. Weights are random (latency depends on the architecture only); the L1 ranking of random
weights is as good a non-uniform width profile as any for this purpose.

    python -m benchmarks.latency_table [--repeats 10] [--channel-multiple 8] [--paper]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pas.landing import WidthRule
from pas.latency import time_alternately
from pas.latency_table import LatencyTable, measure_table, network_case, random_widths
from pas.models import build
from pas.pruners import run_pruner
from pas.search import resolve_budget

MINI = dict(num_classes=10, in_channels=1, resolution=28)
CASES = [("repvgg_b0_mini", MINI, 1), ("repvgg_b0_mini", MINI, 32),
         ("mobilenetv2_mini_035", MINI, 1), ("mobilenetv2_mini_035", MINI, 32)]
PAPER = [("repvgg_b1", dict(num_classes=1000, in_channels=3, resolution=224), 1)]


def two_point(table: LatencyTable) -> LatencyTable:
    """The same table with the two-point calibration: one scale for every layer and a constant."""
    d = table.data
    c = d["calibration"]["two_point"]
    layers = [{k: v for k, v in r.items() if k != "scale"} for r in d["layers"]]
    return LatencyTable({**d, "layers": layers, "scale": c["scale"], "rest_ms": c["rest_ms"]}, "two-point")


def same_loop(table: LatencyTable, arch, checks: list[dict]) -> dict:
    """Errors on the networks the table timed in its own loop beside the fitted ones but did not fit
    to (no drift between them): random widths and uniform scales."""
    out = {}
    for kind, rows in (("random", [c for c in checks if c["scale"] is None]),
                       ("uniform", [c for c in checks if c["scale"] is not None])):
        e = [table.predict(arch, c["widths"]) / c["measured_ms"] - 1 for c in rows]
        out[kind] = (statistics.median(abs(v) for v in e), max(e, key=abs)) if e else (float("nan"), float("nan"))
    return out


def errors(table: LatencyTable, arch, nets: dict, measured: dict, names: list[str]) -> dict:
    full = table.predict(arch, arch.full_widths())
    ms = [table.predict(arch, nets[n]) / measured[n] - 1 for n in names]
    # the same as shares of the full network measured beside them: free of the machine's drift
    # between the table's measurement and this one
    shares = [table.predict(arch, nets[n]) / full / (measured[n] / measured["full"]) - 1 for n in names]
    return {"median_abs_error": statistics.median(abs(e) for e in ms), "worst_error": max(ms, key=abs),
            "median_abs_share_error": statistics.median(abs(e) for e in shares),
            "worst_share_error": max(shares, key=abs)}


def run_case(backbone: str, shape: dict, batch: int, runtime: str, *, rounds: int, n_random: int, seed: int,
             channel_multiple: int = 1) -> dict:
    torch.manual_seed(seed)
    model = build(backbone, **shape).eval()
    arch = model.arch
    t0 = time.perf_counter()
    table = measure_table(model, batch=batch, runtime=runtime, rounds=rounds, warmup=3, check_random=n_random,
                          channel_multiple=channel_multiple)
    table_s = time.perf_counter() - t0
    rule = WidthRule(arch, channel_multiple)
    drawn = random_widths(arch, rule, n_random, seed=seed)
    nets = {"full": arch.full_widths(), **{f"random{i}": w for i, w in enumerate(drawn)}}
    budgets = {}
    full, lowest = table.predict(arch, arch.full_widths()), table.predict(arch, rule.minimum())
    for third in (1, 2):  # a third and two thirds of the way from the narrowest widths to the full network
        budget = resolve_budget(f"{lowest + third / 3 * (full - lowest):.6f}ms", arch, latency_table=table)
        for method in ("uniform", "l1"):
            landing = run_pruner(method, model, budget.target, cost=budget.cost(arch), tolerance=0.02,
                                 channel_multiple=channel_multiple)
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
    landed = {n: (measured[n] / measured["full"]) / (budgets[n] / full) for n in budgets}
    one_scale = two_point(table)
    return {"case": f"{backbone} {shape['resolution']}px b{batch} {runtime}", "table_s": table_s,
            "full_ms": table.data["full_ms"], "full_now_ms": measured["full"],
            "fitted": {**errors(table, arch, nets, measured, randoms),
                       **same_loop(table, arch, table.data["check"])},
            "two_point": {**errors(one_scale, arch, nets, measured, randoms),
                          **same_loop(one_scale, arch, table.data["check"])},
            "fit_error": table.data["calibration"]["fit_error"], "landed": landed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per point and per network")
    p.add_argument("--random", type=int, default=8, help="random width settings per case")
    p.add_argument("--runtimes", nargs="+", default=["pytorch", "onnxruntime"])
    p.add_argument("--channel-multiple", type=int, default=1, help="widths on multiples of this (table, "
                                                                   "random networks, landings)")
    p.add_argument("--paper", action="store_true", help="also RepVGG-B1 at 224 px, batch 1 (minutes)")
    args = p.parse_args()
    print("case | table s | full ms (table; now) | calibration (fit's own median |err|) | in the table's loop, random: "
          "median |err|, worst | in the table's loop, uniform x1/4-3/4: median |err|, worst | later, random, ms: "
          "median |err|, worst | later, random, share of full: median |err|, worst | measured share / budget share "
          "(uniform, l1 at 1/3, 2/3)")
    for backbone, shape, batch in CASES + (PAPER if args.paper else []):
        for runtime in args.runtimes:
            r = run_case(backbone, shape, batch, runtime, rounds=args.repeats, n_random=args.random, seed=0,
                         channel_multiple=args.channel_multiple)
            landed = ", ".join(f"{n} {v:.3f}" for n, v in r["landed"].items())
            for name in ("fitted", "two_point"):
                e = r[name]
                fit = f" ({r['fit_error']:.1%})" if name == "fitted" else ""
                print(f"{r['case']} | {r['table_s']:.0f} | {r['full_ms']:.3f}; {r['full_now_ms']:.3f} | {name}{fit} | "
                      f"{e['random'][0]:.1%}, {e['random'][1]:+.1%} | {e['uniform'][0]:.1%}, {e['uniform'][1]:+.1%} | "
                      f"{e['median_abs_error']:.1%}, {e['worst_error']:+.1%} | {e['median_abs_share_error']:.1%}, "
                      f"{e['worst_share_error']:+.1%} | {landed if name == 'fitted' else '-'}", flush=True)
    print("goals: |prediction error| <= 10% at batch 1 and 32 (CPU); measured latency within 5% of the budget")


if __name__ == "__main__":
    main()
