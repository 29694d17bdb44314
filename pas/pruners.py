"""Baseline pruners: masks in the same format as PaS's gates, at the same MACs target.

Scoring (how important is each channel) is kept apart from the decision (which masks meet the
target); every pruner ends in `pas.search.adjust_masks`, so all methods land on the target the
same way and go through the same fine-tune and compaction path.
"""
from __future__ import annotations

import torch
from torch import nn

from pas.errors import PasError
from pas.gates import gate_sites
from pas.models.layers import ConvBNAct
from pas.models.repvgg import RepVGGBlock
from pas.search import DEFAULT_TOLERANCE, adjust_masks


def bn_gamma_scores(model: nn.Module) -> list[torch.Tensor]:
    """|gamma| of the 3x3 BN + |gamma| of the 1x1 BN per channel (RepVGG); |gamma| of the BN
    after the expansion conv (MobileNetV2)."""
    scores = []
    for site in gate_sites(model):
        if isinstance(site, RepVGGBlock):
            scores.append(site.rbr_dense[1].weight.abs() + site.rbr_1x1[1].weight.abs())
        elif isinstance(site, ConvBNAct):
            scores.append(site.bn.weight.abs())
        else:
            raise PasError(f"BN-gamma scores need the training form, got {type(site).__name__}")
    return [s.detach().cpu() for s in scores]


def l1_scores(model: nn.Module) -> list[torch.Tensor]:
    """L1 norm of each output channel's fused kernel (BN and branches folded in)."""
    scores = []
    for site in gate_sites(model):
        fused = site.fuse() if hasattr(site, "fuse") else site
        scores.append(fused.conv.weight.detach().abs().flatten(1).sum(1).cpu())
    return scores


def uniform_masks(model: nn.Module, target: int, *, tolerance: float = DEFAULT_TOLERANCE,
                  min_channels: int = 1) -> list[torch.Tensor]:
    """One width factor for every layer (found by bisection); within a layer the channels with the
    largest fused-kernel L1 norm are kept; single channels are then flipped to meet the target."""
    arch, full = model.arch, model.arch.searchable_widths()
    scores = l1_scores(model)

    def widths(f):
        return [max(min(min_channels, w), min(w, round(f * w))) for w in full]

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if arch.macs(widths(mid)) <= target else (lo, mid)
    masks = []
    for s, n in zip(scores, widths(lo)):
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[torch.argsort(s, descending=True)[:n]] = True
        masks.append(m)
    return adjust_masks(arch, masks, scores, target, tolerance=tolerance, min_channels=min_channels)


def magnitude_masks(model: nn.Module, target: int, scores: list[torch.Tensor], *,
                    tolerance: float = DEFAULT_TOLERANCE, min_channels: int = 1) -> list[torch.Tensor]:
    """Global ranking: drop the smallest-scored channels of the whole network until the target."""
    everything = [torch.ones(s.numel(), dtype=torch.bool) for s in scores]
    return adjust_masks(model.arch, everything, scores, target, tolerance=tolerance, min_channels=min_channels)


PRUNERS = {
    "uniform": lambda model, target, **kw: uniform_masks(model, target, **kw),
    "bn_gamma": lambda model, target, **kw: magnitude_masks(model, target, bn_gamma_scores(model), **kw),
    "l1": lambda model, target, **kw: magnitude_masks(model, target, l1_scores(model), **kw),
}


def prune(method: str, model: nn.Module, target: int, **kw) -> list[torch.Tensor]:
    if method not in PRUNERS:
        raise PasError(f"unknown pruning method {method!r}; expected one of {sorted(PRUNERS)}")
    return PRUNERS[method](model, target, **kw)
