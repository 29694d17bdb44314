"""Baseline pruners: masks in the same format as PaS's gates, at the same MACs target.

Scoring (how important is each channel) is kept apart from the decision (which masks meet the
target); every pruner ends in `pas.landing.land`, so all methods land on the target the same way,
on the same allowed widths (search.channel_multiple, grouped convs), and go through the same
fine-tune and compaction path.
"""
from __future__ import annotations

import torch
from torch import nn

from pas.errors import PasError
from pas.gates import network_of
from pas.reparam import fold_bn, out_dim_of
from pas.landing import DEFAULT_TOLERANCE, Landing, WidthRule, land


def _producers(model: nn.Module):
    """Per searched group, [(producer module, the module after which it is masked)]."""
    net = network_of(model)
    return [[(model.get_submodule(p), model.get_submodule(s)) for p, s in zip(g.producers, g.sites)]
            for g in net.groups()]


def bn_gamma_scores(model: nn.Module) -> list[torch.Tensor]:
    """Per channel of every searched group: the sum of |gamma| of the BNs that scale its producers'
    outputs (a RepVGG block: its 3x3 and 1x1 branch BNs; a conv: the BN after it). A group without
    any BN (a squeeze-excitation bottleneck) has nothing to rank: it scores +inf and stays whole."""
    scores = []
    for group, producers in zip(network_of(model).groups(), _producers(model)):
        bns = []
        for producer, site in producers:
            bns += producer.output_bns() if callable(getattr(producer, "output_bns", None)) else \
                [site] if isinstance(site, nn.modules.batchnorm._BatchNorm) else []
        scores.append(sum(bn.weight.detach().abs() for bn in bns).cpu() if bns
                      else torch.full((group.size,), float("inf")))
    if all(torch.isinf(s).all() for s in scores):
        raise PasError("BN-gamma scores need BNs after the convs, and this network has none (a deployed or "
                       "BN-free network); use the l1 or uniform baseline")
    return scores


def filter_l1(model: nn.Module) -> list[torch.Tensor]:
    """Per channel of every searched group: the L1 norm of the output channel's fused kernel (BN
    and branches folded in), summed over the group's producers. A transposed conv's kernel of output
    channel o is its weight[:, o]."""
    scores = []
    for producers in _producers(model):
        total = 0
        for producer, site in producers:
            if callable(getattr(producer, "fuse", None)):
                weight = producer.fuse().conv.weight  # BN folded with running statistics, any mode
            elif isinstance(site, nn.modules.batchnorm._BatchNorm) and site is not producer:
                weight = fold_bn(producer.weight, None, site, out_dim=out_dim_of(producer))[0]
            else:
                weight = producer.weight
            total = total + weight.detach().abs().transpose(0, out_dim_of(producer)).flatten(1).sum(1)
        scores.append(total.cpu())
    return scores


def l1_scores(model: nn.Module) -> list[torch.Tensor]:
    """L1 magnitude as in Li et al. 2017 ("Pruning Filters for Efficient ConvNets"), ranked globally.

    Li et al. rank the filters of each layer by their L1 norm s_j (`filter_l1`) and choose every
    layer's pruning ratio by a rule. Here the rule is a global ranking of the norms standardised per
    layer:  z_j = (s_j - mean_l(s)) / std_l(s)  (population std over the layer's channels; 0 for a
    layer whose channels are all equal). Within a layer the order is Li et al.'s. Across layers it
    does not depend on fan-in or weight scale: a filter's L1 is a sum of C_in * k^2 terms, so raw
    norms grow with fan-in (a fresh repvgg_b0_mini at 50% MACs kept 1 of 8 stem channels and every
    stage-4 one), and dividing by the layer's mean filter L1 equalises the means but not the spread,
    which shrinks like 1/sqrt(C_in * k^2): low-fan-in layers still lost most (a fresh repvgg_b0_mini
    at 50%: stem 3 of 8 kept, stage 4 up to 81%). With z, layers whose weights come from one
    distribution keep about the same share (the test's expectation), and a layer loses more only
    where some of its filters lie further below its own typical filter.
    """
    return [_standardised(s) for s in filter_l1(model)]


def _standardised(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean()) / s.std(correction=0).clamp_min(torch.finfo(s.dtype).tiny)


def uniform_masks(model: nn.Module, target: float, *, channel_multiple: int = 1, tolerance: float = DEFAULT_TOLERANCE,
                  min_channels: int = 1, floor: float | None = None, cost=None) -> Landing:
    """One width factor f for every layer (found by bisection; each width round(f * full) moved to
    its nearest allowed width); within a layer the channels with the largest fused-kernel L1 norm are
    kept; the landing then moves single steps to meet the target (MACs, or `cost(widths)`)."""
    arch = network_of(model)
    measure = cost or arch.macs
    rule = WidthRule(arch, channel_multiple, min_channels, floor)
    scores = l1_scores(model)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(rule.scaled(mid)) <= target else (lo, mid)
    masks = []
    for s, n in zip(scores, rule.scaled(lo)):
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[torch.argsort(s, descending=True)[:n]] = True
        masks.append(m)
    return land(arch, masks, scores, target, channel_multiple=channel_multiple, tolerance=tolerance,
                min_channels=min_channels, floor=floor, cost=cost)


def magnitude_masks(model: nn.Module, target: float, scores: list[torch.Tensor], *, channel_multiple: int = 1,
                    tolerance: float = DEFAULT_TOLERANCE, min_channels: int = 1, floor: float | None = None, cost=None) -> Landing:
    """Global ranking: drop the smallest-scored channels of the whole network until the target. The
    landing's drop step is this ranking, so what it moved is no measure of anything (None)."""
    everything = [torch.ones(s.numel(), dtype=torch.bool) for s in scores]
    return land(network_of(model), everything, scores, target, channel_multiple=channel_multiple,
                tolerance=tolerance, min_channels=min_channels, floor=floor, cost=cost).without_start()


PRUNERS = {
    "uniform": lambda model, target, **kw: uniform_masks(model, target, **kw),
    "bn_gamma": lambda model, target, **kw: magnitude_masks(model, target, bn_gamma_scores(model), **kw),
    "l1": lambda model, target, **kw: magnitude_masks(model, target, l1_scores(model), **kw),
}


def run_pruner(method: str, model: nn.Module, target: int, **kw) -> Landing:
    """The landed masks of a baseline and what the landing moved (keywords: channel_multiple,
    tolerance, min_channels, cost: a latency budget's `Budget.cost(arch)`)."""
    if method not in PRUNERS:
        raise PasError(f"unknown pruning method {method!r}; expected one of {sorted(PRUNERS)}")
    return PRUNERS[method](model, target, **kw)


def prune(method: str, model: nn.Module, target: int, **kw) -> list[torch.Tensor]:
    """The landed masks of a baseline (`run_pruner(...).masks`)."""
    return run_pruner(method, model, target, **kw).masks
