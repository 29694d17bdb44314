"""4. Pruning speed-up efficiency: (full / pruned latency) / (full / pruned MACs) per PaS variant.

Reads the PaS variants a workflow run deployed (results/seed*/models/pas/*/deploy/arch.json (the first seed)),
or the widths of searches' masks.json files (`--masks`: latency depends on the widths, not on the
weights, so a search alone gives the figure), and times each plain network against the plain full
backbone it was searched from, side by side, on the CPU. An efficiency of 1 means latency shrank
exactly as much as MACs did.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import interleaved, verdict
from pas.deploy import load_network
from pas.models import build_deployed


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--goal", type=float, default=0.8, help="efficiency goal at batch >= 64 (default 0.8)")
    p.add_argument("--masks", nargs="+", metavar="NAME=MASKS_JSON",
                   help="searched masks instead of deployed networks (the embedded data's shape: 28 px, 1 channel, "
                        "10 classes)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    networks = []  # (variant, backbone, pruned Network)
    if a.masks:
        from pas.config import named_values
        from pas.models import arch_for
        for variant, path in named_values(a.masks, option="--masks", value="MASKS_JSON").items():
            m = json.loads(Path(path).read_text())
            arch = arch_for(m["backbone"], num_classes=10, in_channels=1, resolution=28)
            networks.append((variant, m["backbone"], arch.with_widths(m["widths"])))
    else:
        seeds = sorted(Path(a.results).glob("seed*/models/pas"))
        archs = sorted(seeds[0].glob("*/deploy/arch.json")) if seeds else []
        if not archs:
            print(f"pruning efficiency: no deployed PaS variants under {a.results}/seed*/models/pas (run the "
                  f"workflow first)")
        for path in archs:
            backbone = json.loads((path.parent.parent / "eval.json").read_text())["backbone"]
            networks.append((path.parent.parent.name, backbone, load_network(path)))
    for variant, backbone, pruned_arch in networks:
        full_arch = pruned_arch.with_widths(pruned_arch.full_widths())
        full, pruned = build_deployed(full_arch).eval(), build_deployed(pruned_arch).eval()
        macs_ratio = full_arch.macs() / pruned_arch.macs()
        for b in a.batches:
            x = torch.randn(b, full_arch.in_channels, full_arch.resolution, full_arch.resolution)
            with torch.inference_mode():
                t_full, t_pruned, ratio = interleaved(lambda: full(x), lambda: pruned(x), repeats=a.repeats)
            efficiency = (1 / ratio) / macs_ratio
            goal = verdict(efficiency, a.goal, at_most=False) if b >= 64 else "reported as measured"
            print(f"{variant} ({backbone}): MACs {macs_ratio:.2f}x fewer, latency {1 / ratio:.2f}x lower at "
                  f"batch {b} ({t_pruned * 1e3:.2f} vs {t_full * 1e3:.2f} ms): efficiency {efficiency:.2f}, {goal}")
            rows.append({"benchmark": f"pruning efficiency {variant} (batch {b})", "ratio": efficiency,
                         "goal": f">= {a.goal}" if b >= 64 else "-"})
    return rows


if __name__ == "__main__":
    main()
