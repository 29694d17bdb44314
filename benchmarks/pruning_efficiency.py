"""4. Pruning speed-up efficiency: (full / pruned latency) / (full / pruned MACs) per PaS variant,
and the most any widths of the same MACs could reach on that backbone.

Reads the PaS variants a workflow run deployed (results/seed*/models/pas/*/deploy/arch.json (the first seed)),
or the widths of searches' masks.json files (`--masks`: latency depends on the widths, not on the
weights, so a search alone gives the figure), and times each plain network, the plain full backbone
it was searched from and that backbone at its narrowest allowed widths (every searched width at the
least its `channel_multiple` allows) alternately in one loop (`pas.latency.time_alternately`), on
the CPU. An efficiency of 1 means latency shrank exactly as much as MACs did.

The narrowest network bounds what pruning can do: more channels never run faster (on widths on a
multiple the hardware likes), so no width setting of the backbone runs faster than it, and at
`M` MACs the efficiency is at most `(T_full / T_narrowest) / (M_full / M)` (the ceiling printed).
Where the ceiling is below the goal, the goal is out of reach on this machine for any search.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import verdict
from pas.deploy import load_network
from pas.landing import WidthRule
from pas.latency import Case, _torch_call, time_alternately
from pas.models import build_deployed


def efficiency(full_ms: float, pruned_ms: float, full_macs: int, macs: int) -> float:
    """Latency speed-up over MACs reduction."""
    return (full_ms / pruned_ms) / (full_macs / macs)


def ceiling(full_ms: float, narrowest_ms: float, full_macs: int, macs: int) -> float:
    """The highest efficiency any widths of `macs` MACs can reach, if none runs faster than the
    narrowest allowed widths (`narrowest_ms`)."""
    return efficiency(full_ms, narrowest_ms, full_macs, macs)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--goal", type=float, default=0.8, help="efficiency goal at batch >= 32 (default 0.8)")
    p.add_argument("--masks", nargs="+", metavar="NAME=MASKS_JSON",
                   help="searched masks instead of deployed networks (the embedded data's shape: 28 px, 1 channel, "
                        "10 classes)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    networks = []  # (variant, backbone, pruned Network, channel multiple)
    if a.masks:
        from pas.config import named_values
        from pas.models import arch_for
        for variant, path in named_values(a.masks, option="--masks", value="MASKS_JSON").items():
            m = json.loads(Path(path).read_text())
            arch = arch_for(m["backbone"], num_classes=10, in_channels=1, resolution=28)
            networks.append((variant, m["backbone"], arch.with_widths(m["widths"]), m.get("channel_multiple", 1)))
    else:
        seeds = sorted(Path(a.results).glob("seed*/models/pas"))
        archs = sorted(seeds[0].glob("*/deploy/arch.json")) if seeds else []
        if not archs:
            print(f"pruning efficiency: no deployed PaS variants under {a.results}/seed*/models/pas (run the "
                  f"workflow first)")
        for path in archs:
            model = path.parent.parent
            backbone = json.loads((model / "eval.json").read_text())["backbone"]
            masks = model / "search" / "masks.json"
            multiple = json.loads(masks.read_text()).get("channel_multiple", 1) if masks.exists() else 1
            networks.append((model.name, backbone, load_network(path), multiple))
    for variant, backbone, pruned_arch, multiple in networks:
        full_arch = pruned_arch.with_widths(pruned_arch.full_widths())
        narrow_arch = pruned_arch.with_widths(WidthRule(full_arch, multiple).minimum())
        archs = {"full": full_arch, "pruned": pruned_arch, "narrowest": narrow_arch}
        nets = {k: build_deployed(v).eval() for k, v in archs.items()}
        macs = {k: v.macs() for k, v in archs.items()}
        for b in a.batches:
            x = torch.randn(b, full_arch.in_channels, full_arch.resolution, full_arch.resolution)
            cases = [Case(k, "pytorch", "cpu", b, _torch_call(net, x, "cpu")) for k, net in nets.items()]
            ms = {c.model: r["latency_ms"] for c, r in zip(cases, time_alternately(cases, rounds=a.repeats, warmup=3))}
            eff = efficiency(ms["full"], ms["pruned"], macs["full"], macs["pruned"])
            top = ceiling(ms["full"], ms["narrowest"], macs["full"], macs["pruned"])
            if b < 32:
                goal = "reported as measured"
            else:
                goal = verdict(eff, a.goal, at_most=False)
                if eff < a.goal and top < a.goal:
                    goal += f"; out of reach here: no widths of {macs['pruned']:,} MACs reach more than {top:.2f}"
            print(f"{variant} ({backbone}): MACs {macs['full'] / macs['pruned']:.2f}x fewer, latency "
                  f"{ms['full'] / ms['pruned']:.2f}x lower at batch {b} ({ms['pruned']:.2f} vs {ms['full']:.2f} ms): "
                  f"efficiency {eff:.2f}, {goal}; the narrowest allowed widths ({macs['narrowest']:,} MACs, "
                  f"x{multiple}) run {ms['full'] / ms['narrowest']:.2f}x faster than the full: ceiling {top:.2f}")
            rows.append({"benchmark": f"pruning efficiency {variant} (batch {b})", "ratio": eff,
                         "ceiling": top, "goal": f">= {a.goal}" if b >= 32 else "-"})
    return rows


if __name__ == "__main__":
    main()
