"""The search objective and the MACs target: CE + alpha * ((MACs - target) / MACs_full)^2.

The paper writes alpha * (MACs - target)^2 with MACs in GMACs and alpha = 0.1 on RepVGG-B1
(11.8 GMACs). Dividing by the full network's MACs makes alpha scale-free:
    alpha_here = alpha_paper * (MACs_full in GMACs)^2 = 0.1 * 11.8^2 ~= 14   for B1 at 224.
The same alpha then means the same pull on a 4 MMACs network for 28x28 images, so one default
(DEFAULT_ALPHA) serves the ImageNet B1 search and the embedded default alike.

Landing on the target: the soft penalty leaves the masks near, not at, the target (CE pulls
upwards, and one channel is a coarse step in a small network). After the search, `adjust_masks`
moves the fewest channels, those whose gate weights lie nearest the 0.5 threshold, until the
compact network's MACs are at most the target and within the tolerance (default 1%) of it. Those
channels are the ones the search itself was least sure about, so the change is the smallest one
that honours the budget, and it is deterministic.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from pas.errors import PasError
from pas.engine import OptimConfig, Trainer
from pas.gates import attach_gates, gated_macs, gates_of, has_gates, kept_widths, network_of, set_masks
from pas.graph.network import Network

DEFAULT_ALPHA = 14.0
DEFAULT_TOLERANCE = 0.01
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def minimum_macs(arch: Network, min_channels: int = 1) -> int:
    widths = [min(min_channels, w) for w in arch.searchable_widths()]
    return int(arch.macs(widths))


def resolve_target(target, arch: Network, min_channels: int = 1) -> int:
    """Absolute target MACs from '1.36G', '2.5M', 1360000000 (absolute) or '40%', 0.4 (fraction).

    A number in (0, 1] or a percentage is a fraction of the full network's MACs; a number above 1
    or a figure with a K/M/G suffix is absolute.
    """
    full = int(arch.macs())
    lowest = minimum_macs(arch, min_channels)
    if isinstance(target, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kKmMgG%]?)\s*", target)
        if not m:
            raise PasError(f"target {target!r} is not a MACs figure; expected e.g. '1.36G', '2.5M', "
                           f"'40%' or a number")
        value, unit = float(m.group(1)), m.group(2).lower()
        macs = value / 100 * full if unit == "%" else value * _SUFFIX[unit]
    elif isinstance(target, (int, float)) and not isinstance(target, bool):
        macs = target * full if 0 < target <= 1 else float(target)
    else:
        raise PasError(f"target {target!r} is not a MACs figure; expected a number or a string")
    if macs <= 0:
        raise PasError(f"target {target!r} must be positive; allowed range is ({lowest}, {full}) MACs")
    if macs >= full:
        raise PasError(f"target {target!r} = {macs:.0f} MACs is not below the full network's {full} "
                       f"MACs; allowed range is ({lowest}, {full})")
    if macs < lowest:
        raise PasError(f"target {target!r} = {macs:.0f} MACs is below {lowest}, the MACs with "
                       f"{min_channels} channel(s) per layer; allowed range is ({lowest}, {full})")
    return int(round(macs))


class MacsPenalty(nn.Module):
    """alpha * ((MACs(b) - target) / MACs_full)^2, two-sided, differentiable through the gates."""

    def __init__(self, arch: Network, target_macs: int, alpha: float = DEFAULT_ALPHA):
        super().__init__()
        self.arch, self.target, self.alpha = arch, int(target_macs), float(alpha)
        self.full = int(arch.macs())

    def forward(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        macs = gated_macs(model, self.arch)
        return self.alpha * ((macs - self.target) / self.full) ** 2, macs


def adjust_masks(arch: Network, masks: list[torch.Tensor], scores: list[torch.Tensor], target: int, *,
                 tolerance: float = DEFAULT_TOLERANCE, min_channels: int = 1,
                 max_swaps: int = 64) -> list[torch.Tensor]:
    """Fewest channel flips, lowest/highest scores first, so that target*(1-tol) <= MACs <= target.

    First drop kept channels in ascending score until MACs <= target, then add dropped channels in
    descending score wherever one still fits under the target. Used by PaS (scores = gate weights)
    and by the magnitude baselines (all kept at first, scores = magnitudes: global ranking).
    When every dropped channel costs more than the gap left (a ranking that dropped only channels of
    expensive, high-resolution layers), channels are swapped: one dropped channel in, one kept channel
    of another layer out, the pair that brings the MACs closest to the target (within it, the best
    scores), until the MACs are within the tolerance.
    """
    keep = [m.detach().bool().cpu().clone() for m in masks]
    score = [s.detach().float().cpu() for s in scores]
    counts = [int(m.sum()) for m in keep]
    flat = sorted((float(s[j]), li, j) for li, s in enumerate(score) for j in range(s.numel()))
    macs = int(arch.macs(counts))
    for _, li, j in flat:  # ascending: drop the least important kept channels
        if macs <= target:
            break
        if keep[li][j] and counts[li] > min_channels:
            keep[li][j] = False
            counts[li] -= 1
            macs = int(arch.macs(counts))

    def fill(macs: int) -> int:
        for _, li, j in reversed(flat):  # descending: add back the most important that still fit
            if not keep[li][j]:
                counts[li] += 1
                trial = int(arch.macs(counts))
                if trial <= target:
                    keep[li][j], macs = True, trial
                else:
                    counts[li] -= 1
        return macs

    macs = fill(macs)
    for _ in range(max_swaps):
        if target - macs <= tolerance * target:
            break
        swap = _best_swap(arch, keep, score, counts, macs, target, tolerance, min_channels)
        if swap is None:
            break
        (a, ja), (b, jb) = swap
        keep[a][ja], keep[b][jb] = True, False
        counts[a] += 1
        counts[b] -= 1
        macs = fill(int(arch.macs(counts)))
    if abs(macs - target) > tolerance * target:
        raise PasError(f"cannot reach target {target} MACs within {tolerance:.1%}: the closest "
                       f"mask gives {macs} MACs")
    return keep


def _best_swap(arch, keep, score, counts, macs, target, tolerance, min_channels):
    """((layer in, channel), (layer out, channel)) that raises the MACs the most without passing the
    target; among the pairs that land within the tolerance, the one with the best score gain."""
    best_in = {li: max((float(s[j]), j) for j in range(s.numel()) if not keep[li][j])
               for li, s in enumerate(score) if not bool(keep[li].all())}
    worst_out = {li: min((float(s[j]), j) for j in range(s.numel()) if keep[li][j])
                 for li, s in enumerate(score) if counts[li] > min_channels}
    best, best_key = None, None
    for a, (sa, ja) in best_in.items():
        for b, (sb, jb) in worst_out.items():
            if a == b:
                continue
            trial = list(counts)
            trial[a] += 1
            trial[b] -= 1
            m = int(arch.macs(trial))
            if not macs < m <= target:
                continue
            lands = target - m <= tolerance * target
            key = (lands, sa - sb if lands else m)
            if best_key is None or key > best_key:
                best, best_key = ((a, ja), (b, jb)), key
    return best


@dataclass
class SearchResult:
    masks: list[torch.Tensor]
    target_macs: int
    macs: int  # of the final masks, after the adjustment
    searched_macs: int  # of the masks the gates alone gave at the end of the search
    history: list[dict]
    metrics: list[dict]


def search(model: nn.Module, train_loader, *, target, example_input: torch.Tensor | None = None,
           epochs: int = 10, optim=None,
           alpha: float = DEFAULT_ALPHA, min_channels: int = 1, tolerance: float = DEFAULT_TOLERANCE,
           history_every: int = 10, val_loader=None, seed: int = 0, state_path=None, fingerprint=None, on_epoch=None,
           world=None, progress: bool = False) -> SearchResult:
    """Train weights and DBC gates jointly on CE + MACs penalty, then land on the target.

    Works on any traceable CNN: a model built by `pas.models.build` carries its channel graph; any
    other module is traced on `example_input` (one batch, or one image's shape) first.
    `train_loader` is an iterable of (x, y) batches, or `train_loader(epoch)` returns one epoch's.
    Gates are attached if the model has none. On return the gates realise the final masks (also in
    `SearchResult.masks`); `pas.compact.compact(model)` then gives the compact network.
    """
    if example_input is not None and not isinstance(getattr(model, "arch", None), Network):
        from pas.graph.network import describe
        describe(model, example_input)
    arch = network_of(model)
    target_macs = resolve_target(target, arch, min_channels)
    if not callable(train_loader):
        batches = train_loader
        train_loader = lambda epoch: batches  # noqa: E731
    if not has_gates(model):
        attach_gates(model, min_channels=min_channels)
    penalty = MacsPenalty(arch, target_macs, alpha)
    trainer = Trainer(model, train_loader=train_loader, val_loader=val_loader, epochs=epochs,
                      optim=optim or OptimConfig(lr=0.02, schedule="constant"), seed=seed,
                      state_path=state_path, fingerprint=fingerprint, penalty=penalty, on_epoch=on_epoch, world=world,
                      progress=progress)

    def record(epoch, step, macs):
        n = len(trainer.history)
        if step % history_every == 0:
            trainer.history.append({"epoch": epoch + 1, "step": step, "record": n,
                                    "macs": int(round(float(macs.detach()))), "kept": kept_widths(model)})

    trainer.on_step = record
    metrics = trainer.fit()
    gates = gates_of(model)
    current = [g.mask().detach() > 0.5 for g in gates]
    searched = int(arch.macs([int(m.sum()) for m in current]))
    final = adjust_masks(arch, current, [g.weight for g in gates], target_macs,
                         tolerance=tolerance, min_channels=min_channels)
    set_masks(model, final, min_channels=min_channels)
    return SearchResult(final, target_macs, int(arch.macs([int(m.sum()) for m in final])), searched,
                        trainer.history, metrics)
