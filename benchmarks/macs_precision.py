"""2. MACs target precision: |achieved - target| / target for every target of the given configs.

Computed on the architecture alone (random weights, no data): the landing step that every method
ends in (`adjust_masks`) is what puts a mask on its target, whatever the weights. PaS is landed
from random gate weights around the 0.5 threshold, the baselines from random-initialised weights.
"""
from __future__ import annotations

import argparse

import torch
import yaml

from pas.landing import adjust_masks
from pas.models import build
from pas.pruners import prune
from pas.search import resolve_target


def targets_from_config(path: str) -> list[tuple[str, str, int, object]]:
    """(variant, backbone, resolution, target) for every variant of a workflow config."""
    cfg = yaml.safe_load(open(path))
    data = cfg.get("dataset", {})
    res = data.get("resolution") or (224 if data.get("name") == "imagenet" else 28)
    out = []
    for v in cfg.get("variants", []):
        out.append((v["name"], v.get("backbone") or cfg["backbones"][v["family"]]["name"], res, v["target"]))
    return out


def land(backbone: str, resolution: int, target, method: str, in_channels: int) -> tuple[int, int]:
    torch.manual_seed(0)
    model = build(backbone, num_classes=1000 if resolution >= 64 else 10, in_channels=in_channels,
                  resolution=resolution)
    t = resolve_target(target, model.arch)
    if method == "pas":
        g = torch.Generator().manual_seed(0)
        scores = [0.5 + 0.2 * torch.randn(w, generator=g) for w in model.arch.searchable_widths()]
        masks = adjust_masks(model.arch, [s > 0.5 for s in scores], scores, t)
    else:
        masks = prune(method, model, t)
    return t, int(model.arch.macs([int(m.sum()) for m in masks]))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", action="append", default=[], help="workflow config(s) to read targets from")
    p.add_argument("--methods", nargs="+", default=["pas", "uniform", "bn_gamma", "l1"])
    a = p.parse_args(argv)
    rows = []
    cases = []
    for c in a.config:
        cases += [(c, *t) for t in targets_from_config(c)]
    if not cases:  # the paper's targets: RepVGG-B1 at 224 searched to the A0/A1/B0 budgets
        cases = [("paper", f"PaS-{k}", "repvgg_b1", 224, t) for k, t in zip("ABC", ("1.36G", "2.36G", "3.06G"))]
    for source, variant, backbone, res, target in cases:
        for method in a.methods:
            t, macs = land(backbone, res, target, method, 3 if res >= 64 else 1)
            err = abs(macs - t) / t
            print(f"{source}: {variant} ({backbone}@{res}, target {t}) {method}: achieved {macs}, "
                  f"error {err:.4%} ({'met' if err <= 0.01 else 'MISSED'}, goal <= 1%)")
            rows.append({"benchmark": f"MACs precision {variant} {method}", "ratio": err, "goal": "<= 0.01"})
    return rows


if __name__ == "__main__":
    main()
