"""Landing on the target: the allowed widths of every layer, and the fewest channel flips that put a
method's masks on them at the MACs target. PaS and every baseline end here.

Allowed widths. Layer l (a searched channel group of full width F_l) may keep
    W_l = {k * q_l : k >= 1, k * q_l <= F_l}  U  {F_l},   q_l = lcm(channel_multiple, blocks_l),
at least min(min_channels, F_l) of them. `channel_multiple` (search.channel_multiple) aligns widths to
the hardware's channel block (8 or 16 on CPU vector units and GPU tensor cores); a layer narrower than
it keeps its full width, the one width it has. `blocks_l` comes from the grouped convs that read or
write the layer (`pas.graph.channels`): a grouped conv stays one only if every group keeps the same
number of channels, so widths are multiples of the groups and each block of the layer keeps
width / blocks_l channels (which ones may differ from block to block).

The search counts the MACs of these widths: `WidthRule.estimate` rounds every layer's differentiable
kept count to its nearest allowed width in the forward pass and passes the gradient straight through.

Landing. After the search (or a baseline's scoring) `land` moves the fewest channels, those whose
scores lie nearest the decision (gate weights nearest the 0.5 threshold), until the MACs are at most
the target and within the tolerance (default 1%) of it:
1. grid: each layer goes to its nearest allowed width, each block to width / blocks channels, moving
   the channels nearest the decision (a no-op with channel_multiple 1 and no grouped convs);
2. drop: while the MACs exceed the target, the layer whose next step down removes the channels of the
   lowest mean score loses them (a step: to the next allowed width below, the same count from each
   block, each block's lowest scores);
3. fill: while a step up of some layer still fits under the target, the one adding the highest mean
   score is taken;
4. swap: when the MACs are still short of the tolerance (only steps of expensive, high-resolution
   layers were dropped, and adding one back overshoots), a step up of one layer and a step down of
   another are exchanged, the pair that brings the MACs closest to the target (among those that land
   within it, the best score gain), then 3 again.
With steps of one channel, 2 and 3 are "drop kept channels in ascending score, add dropped ones in
descending score wherever they fit": a global ranking, which is what the magnitude baselines are.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from pas.errors import PasError
from pas.graph.network import Network

DEFAULT_TOLERANCE = 0.01


def check_floor(floor) -> None:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1:
        raise PasError(f"floor {floor!r} is outside (0, 1]; expected the fraction of its full width every "
                       f"searched group keeps at least (e.g. 0.1)")


def group_floors(arch: Network, min_channels: int = 1, floor: float | None = None) -> list[int]:
    """Per searched group, the fewest channels it may keep: `min_channels`, or `floor` of its full
    width rounded up, whichever is more (never more than the full width)."""
    if floor is not None:
        check_floor(floor)
    share = floor or 0.0
    return [min(f, max(min_channels, math.ceil(share * f - 1e-9))) for f in arch.full_widths()]


class WidthRule:
    """The allowed widths W_l of every searched group of `arch` (see the module docstring), none below
    the group's floor (`group_floors`)."""

    def __init__(self, arch: Network, channel_multiple: int = 1, min_channels: int = 1,
                 floor: float | None = None):
        check_channel_multiple(channel_multiple)
        self.full = arch.full_widths()
        self.blocks = arch.blocks()
        self.steps = [math.lcm(channel_multiple, b) for b in self.blocks]
        self.floors = group_floors(arch, min_channels, floor)
        self.allowed = [_allowed(f, q, k) for f, q, k in zip(self.full, self.steps, self.floors)]
        self._grids: dict = {}  # (layer, device, dtype) -> allowed widths as a tensor, widest first

    def nearest(self, widths) -> list[int]:
        """Every width moved to its nearest allowed width (halfway: the wider)."""
        return [_nearest(allowed, int(w)) for w, allowed in zip(widths, self.allowed)]

    def minimum(self) -> list[int]:
        return [allowed[0] for allowed in self.allowed]

    def scaled(self, factor: float) -> list[int]:
        """Every full width times `factor`, rounded, on its nearest allowed width."""
        return self.nearest(round(factor * f) for f in self.full)

    def estimate(self, kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """Differentiable kept counts as the landing will see them: each rounded to its nearest allowed
        width in the forward pass, the gradient passed straight through (d estimate / d kept = 1).
        Computed on the counts' device (no host synchronisation in a training step)."""
        if all(q == 1 for q in self.steps):  # every count the gates allow is an allowed width
            return list(kept)
        out = []
        for i, k in enumerate(kept):
            key = (i, k.device, k.dtype)
            if key not in self._grids:  # widest first: argmin's first hit makes halfway the wider
                self._grids[key] = torch.tensor(self.allowed[i][::-1], dtype=k.dtype, device=k.device)
            grid = self._grids[key]
            width = grid[torch.argmin((grid - k.detach()).abs())]
            out.append(k + (width - k.detach()))
        return out


def check_channel_multiple(channel_multiple) -> None:
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise PasError(f"channel_multiple {channel_multiple!r} is not a positive integer; expected 1 (any width) "
                       f"or a channel block such as 8 or 16")


def _nearest(allowed: list[int], width: int) -> int:
    i = bisect.bisect_left(allowed, width)
    candidates = allowed[max(i - 1, 0):i + 1]
    return min(candidates, key=lambda a: (abs(a - width), -a))


def _allowed(full: int, step: int, min_channels: int) -> list[int]:
    widths = sorted(set(range(step, full + 1, step)) | {full})
    return [w for w in widths if w >= min(min_channels, full)] or [full]


@dataclass
class Landing:
    """Landed masks, and what the landing moved from the masks it was given.

    macs_before: MACs of the given masks at their nearest allowed widths (the gates' at the end of a
    search: what its penalty counted; a uniform baseline's widths); moved_channels: channels added
    plus removed; moved_macs_share:
    |macs - macs_before| / MACs of the full network. None where the method's masks are no decision of
    their own (a magnitude baseline starts from the full network: its ranking is the landing itself).
    """
    masks: list[torch.Tensor]
    macs: int
    macs_before: int | None
    moved_channels: int | None
    moved_macs_share: float | None
    predicted_ms: float | None = None  # a latency budget: the table's latency of the landed masks

    def record(self) -> dict:
        """The fields masks.json and MLflow carry."""
        record = {"search_macs_before_landing": self.macs_before, "landing_moved_channels": self.moved_channels,
                  "landing_moved_macs_share": self.moved_macs_share}
        return record if self.predicted_ms is None else {**record, "predicted_latency_ms": self.predicted_ms}

    def without_start(self) -> "Landing":
        return Landing(self.masks, self.macs, None, None, None, self.predicted_ms)


class _Layer:
    """One searched group during the landing: per block, its kept and dropped channels as sorted
    (score, index) lists, so a step takes each block's lowest kept or highest dropped channels."""

    def __init__(self, keep: torch.Tensor, score: torch.Tensor, allowed: list[int], blocks: int):
        self.allowed, self.blocks, self.size = allowed, blocks, keep.numel()
        per = self.size // blocks
        self.kept, self.dropped = [], []
        for b in range(blocks):
            channels = sorted((float(score[j]), j) for j in range(b * per, (b + 1) * per))
            self.kept.append([c for c in channels if keep[c[1]]])
            self.dropped.append([c for c in channels if not keep[c[1]]])

    @property
    def width(self) -> int:
        return sum(len(k) for k in self.kept)

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.size, dtype=torch.bool)
        m[[j for block in self.kept for _, j in block]] = True
        return m

    def to_grid(self, width: int) -> None:
        """`width` channels, the same count in every block: each block's best kept stay, its best
        dropped come in."""
        per_block = width // self.blocks
        for kept, dropped in zip(self.kept, self.dropped):
            while len(kept) > per_block:
                bisect.insort(dropped, kept.pop(0))
            while len(kept) < per_block:
                bisect.insort(kept, dropped.pop())

    def down(self) -> tuple[float, list] | None:
        """(mean score, channels) of the step to the next allowed width below, None at the minimum."""
        i = bisect.bisect_left(self.allowed, self.width)
        if i == 0:
            return None
        n = (self.width - self.allowed[i - 1]) // self.blocks
        channels = [c for kept in self.kept for c in kept[:n]]
        return sum(s for s, _ in channels) / len(channels), channels

    def up(self) -> tuple[float, list] | None:
        """(mean score, channels) of the step to the next allowed width above, None at full width."""
        i = bisect.bisect_left(self.allowed, self.width)
        if i == len(self.allowed) - 1:
            return None
        n = (self.allowed[i + 1] - self.width) // self.blocks
        channels = [c for dropped in self.dropped for c in dropped[len(dropped) - n:]]
        return sum(s for s, _ in channels) / len(channels), channels

    def move(self, channels: list, keep: bool) -> None:
        per = self.size // self.blocks
        for c in channels:
            b = c[1] // per
            source, dest = (self.dropped[b], self.kept[b]) if keep else (self.kept[b], self.dropped[b])
            source.remove(c)
            bisect.insort(dest, c)


def land(arch: Network, masks: list[torch.Tensor], scores: list[torch.Tensor], target: float, *,
         channel_multiple: int = 1, tolerance: float = DEFAULT_TOLERANCE, min_channels: int = 1,
         floor: float | None = None, max_swaps: int = 64, cost=None) -> Landing:
    """Masks on the allowed widths with target * (1 - tolerance) <= cost <= target (module docstring).

    The cost is the MACs, or `cost(widths)` (any measure that grows with every width: a latency
    table's prediction, `pas.latency_table`)."""
    measure = cost or (lambda widths: int(arch.macs(widths)))
    unit = "MACs" if cost is None else "ms"
    rule = WidthRule(arch, channel_multiple, min_channels, floor)
    given = [m.detach().bool().cpu() for m in masks]
    layers = [_Layer(m, s.detach().float().cpu(), allowed, b)
              for m, s, allowed, b in zip(given, scores, rule.allowed, rule.blocks, strict=True)]
    for layer, width in zip(layers, rule.nearest(int(m.sum()) for m in given)):
        layer.to_grid(width)
    macs_before = int(arch.macs(_widths(layers)))
    value = _drop(measure, layers, target, measure(_widths(layers)))
    value = _fill(measure, layers, target, value)
    for _ in range(max_swaps):
        if target - value <= tolerance * target or not _swap(measure, layers, target, value, tolerance):
            break
        value = _fill(measure, layers, target, measure(_widths(layers)))
    if max_swaps and target - value > tolerance * target and _swap_three(measure, layers, target, tolerance):
        value = measure(_widths(layers))
    if abs(value - target) > tolerance * target:
        shown = (lambda v: f"{int(v)}") if cost is None else (lambda v: f"{v:.4g}")
        raise PasError(f"cannot reach target {shown(target)} {unit} within {tolerance:.1%}: the closest mask gives "
                       f"{shown(value)} {unit}{_coarse_steps(rule, channel_multiple)}")
    landed = [layer.mask() for layer in layers]
    moved = sum(int((a ^ b).sum()) for a, b in zip(given, landed))
    macs = int(arch.macs(_widths(layers)))
    return Landing(landed, macs, macs_before, moved, abs(macs - macs_before) / int(arch.macs()),
                   None if cost is None else float(value))


def _coarse_steps(rule: WidthRule, channel_multiple: int) -> str:
    """Why the landing may fall short: widths that move by more than one channel."""
    causes = ([f"channel_multiple {channel_multiple}"] if channel_multiple > 1 else []) + \
        (["the groups of grouped convs"] if max(rule.blocks) > 1 else [])
    if not causes:
        return ""
    remedy = "a larger tolerance or a smaller channel_multiple" if channel_multiple > 1 else "a larger tolerance"
    return (f"; widths move in steps of {sorted(set(rule.steps))} channels ({' and '.join(causes)}): {remedy} "
            f"reaches it")


def adjust_masks(arch: Network, masks: list[torch.Tensor], scores: list[torch.Tensor], target: int,
                 **kw) -> list[torch.Tensor]:
    """The landed masks alone (`land(...).masks`)."""
    return land(arch, masks, scores, target, **kw).masks


def _widths(layers: list[_Layer]) -> list[int]:
    return [layer.width for layer in layers]


def _drop(measure, layers: list[_Layer], target, macs):
    """Step 2: the lowest-scored step down of any layer, until the MACs are at most the target."""
    while macs > target:
        steps = [(step[0], i, step[1]) for i, layer in enumerate(layers) if (step := layer.down())]
        if not steps:
            break
        _, i, channels = min(steps, key=lambda s: s[:2])
        layers[i].move(channels, keep=False)
        macs = measure(_widths(layers))
    return macs


def _fill(measure, layers: list[_Layer], target, macs):
    """Step 3: the highest-scored step up that fits, until none does. A step that does not fit never
    will (adding channels only raises what any other step costs), so its layer is closed."""
    open_layers = set(range(len(layers)))
    while open_layers:
        steps = sorted(((step[0], i, step[1]) for i in open_layers if (step := layers[i].up())),
                       key=lambda s: s[:2], reverse=True)
        open_layers &= {i for _, i, _ in steps}
        for _, i, channels in steps:
            widths = _widths(layers)
            widths[i] += len(channels)
            trial = measure(widths)
            if trial <= target:
                layers[i].move(channels, keep=True)
                macs = trial
                break
            open_layers.discard(i)
        else:
            break
    return macs


def _steps(layers: list[_Layer]) -> tuple[dict, dict]:
    """Every layer's next step up and next step down ({layer: (mean score, channels)}), where it has one."""
    return ({i: step for i, layer in enumerate(layers) if (step := layer.up())},
            {i: step for i, layer in enumerate(layers) if (step := layer.down())})


def _swap_three(measure, layers: list[_Layer], target, tolerance: float) -> bool:
    """Step 5, when 4 could not land: one layer's step up for two other layers' steps down, the triple
    that lands within the tolerance with the best score gain (coarse steps, channel_multiple > 1, can
    leave every pair short of the target and every single step over it). False when none lands."""
    ups, downs = _steps(layers)
    best, best_gain = None, None
    for a, (score_in, channels_in) in ups.items():
        for b, (score_b, channels_b) in downs.items():
            if b == a:
                continue
            for c, (score_c, channels_c) in downs.items():
                if c in (a, b) or c < b:
                    continue
                widths = _widths(layers)
                widths[a] += len(channels_in)
                widths[b] -= len(channels_b)
                widths[c] -= len(channels_c)
                m = measure(widths)
                if not target * (1 - tolerance) <= m <= target:
                    continue
                gain = score_in - score_b - score_c
                if best_gain is None or gain > best_gain:
                    best, best_gain = (a, channels_in, b, channels_b, c, channels_c), gain
    if best is None:
        return False
    a, channels_in, b, channels_b, c, channels_c = best
    layers[a].move(channels_in, keep=True)
    layers[b].move(channels_b, keep=False)
    layers[c].move(channels_c, keep=False)
    return True


def _swap(measure, layers: list[_Layer], target, macs, tolerance: float) -> bool:
    """Step 4: one layer's step up for another's step down, the pair that raises the MACs the most
    without passing the target; among the pairs that land within the tolerance, the best score gain.
    False when no pair raises the MACs."""
    ups, downs = _steps(layers)
    best, best_key = None, None
    for a, (score_in, channels_in) in ups.items():
        for b, (score_out, channels_out) in downs.items():
            if a == b:
                continue
            widths = _widths(layers)
            widths[a] += len(channels_in)
            widths[b] -= len(channels_out)
            m = measure(widths)
            if not macs < m <= target:
                continue
            lands = target - m <= tolerance * target
            key = (lands, score_in - score_out if lands else m)
            if best_key is None or key > best_key:
                best, best_key = (a, channels_in, b, channels_out), key
    if best is None:
        return False
    a, channels_in, b, channels_out = best
    layers[a].move(channels_in, keep=True)
    layers[b].move(channels_out, keep=False)
    return True
