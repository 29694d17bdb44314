"""The search objective and the MACs target.

Two objectives. `constraint` (the default, `BudgetConstraint`): the task loss plus a price per
channel by what it costs, set by a controller on the distance to a budget that ramps down to the
target; the landing ranks channels by their accumulated task-loss importance per cost. `paper`:
CE + alpha * ((MACs - target) / MACs_full)^2, the paper's penalty, the landing by gate weight.

The paper writes alpha * (MACs - target)^2 with MACs in GMACs and alpha = 0.1 on RepVGG-B1
(11.8 GMACs). Dividing by the full network's MACs makes alpha scale-free:
    alpha_here = alpha_paper * (MACs_full in GMACs)^2 = 0.1 * 11.8^2 ~= 14   for B1 at 224.
The same alpha then means the same pull on a 4 MMACs network for 28x28 images, so one default
(DEFAULT_ALPHA) serves the ImageNet B1 search and the embedded default alike.

The gradient of the penalty: MACs(b) = sum over layers of n_in * n_out * k^2 * H * W / groups (the
classifier: n_in * classes). With penalty_gradient "both" (the default) a group's kept count n_l gets
the gradient of every term it appears in, as output and as input width; with "output" (the authors'
code) every input factor is detached, so n_l is pulled only by the layers that write it:
    both:   dMACs/dn_l = sum over layers writing l of n_in k^2 H W / g + sum over layers reading l of n_out k^2 H W / g
    output: dMACs/dn_l = sum over layers writing l of n_in k^2 H W / g.
The kept counts are those the landing will see: each rounded to its nearest allowed width
(`pas.landing.WidthRule`: search.channel_multiple, grouped convs), the gradient straight through.

A latency budget. A target in time ('3.5ms', '800us', or '70% latency' of the full network) with a
latency table (`pas latency-table`, `pas.latency_table`) puts the table's predicted latency of the
gated network in place of the MACs,
in the same two-sided scale-free form: alpha * ((T(b) - target) / (T_full - T_min))^2, T(b)
interpolated in the table at the (rounded, straight-through) kept counts, so differentiable through
the gates; the landing then meets the predicted latency within the tolerance. The scale is the range
the widths control, T_full minus the latency at the narrowest widths: a latency has a part no width
removes (calls, pooling, the classifier), and divided by T_full alone the same alpha would pull a
small network, whose fixed part is large, several times more weakly than the MACs penalty does (on
repvgg_b0_mini at batch 64 a search to 70% of the latency left the gates far above it and the landing
moved half of the MACs). For MACs, whose narrowest count is near zero, the two scales agree.

Landing on the target: the soft penalty leaves the masks near, not at, the target (CE pulls
upwards, and one channel is a coarse step in a small network). After the search, `pas.landing.land`
moves the fewest channels, those whose gate weights lie nearest the 0.5 threshold, until the
compact network's MACs are at most the target and within the tolerance (default 1%) of it. Those
channels are the ones the search itself was least sure about, so the change is the smallest one
that honours the budget, and it is deterministic. With the `constraint` objective the channels are
ranked by importance per cost instead (`importance_per_cost`): the search ends on its budget, and
the few channels the landing moves are the ones that buy the least loss per MAC. What it moved is
recorded (`SearchResult.landing`): a large move means the search had not converged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from pas.errors import PasError
from pas.engine import OptimConfig, Trainer
from pas.gates import GATES_ATTR, attach_gates, gates_of, has_gates, kept_widths, network_of, set_masks
from pas.graph.network import Network
from pas.landing import DEFAULT_TOLERANCE, Landing, WidthRule, land

DEFAULT_ALPHA = 14.0
PENALTY_GRADIENTS = ("both", "output")
OBJECTIVES = ("constraint", "paper")
DEFAULT_GAIN = 2.0
DEFAULT_MULTIPLIER_LR = 0.05
DEFAULT_RAMP = 0.9
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
_TIME = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(ms|us|µs|s|%\s*latency)\s*", re.IGNORECASE)
_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}


def latency_target(target) -> tuple[float, str] | None:
    """A latency target: (milliseconds, "ms") for '3.5ms', '800us', '0.02s'; (percent, "%") for
    '70% latency' (of the full network's predicted latency); None for a MACs target."""
    m = _TIME.fullmatch(target) if isinstance(target, str) else None
    if m is None:
        return None
    unit = m.group(2).lower()
    return (float(m.group(1)), "%") if unit.startswith("%") else (float(m.group(1)) * _MS[unit], "ms")


@dataclass(frozen=True)
class Budget:
    """What a search or a baseline lands on: MACs, or a latency predicted by a table (ms)."""
    target: float
    full: float
    table: object = None  # pas.latency_table.LatencyTable for a latency budget
    lowest: float = 0.0  # the cost at the narrowest allowed widths (MACs, or the predicted latency)

    @property
    def latency(self) -> bool:
        return self.table is not None

    def cost(self, arch: Network):
        """widths -> cost, for the landing: None (the MACs) or the table's prediction."""
        return None if self.table is None else (lambda widths: self.table.predict(arch, widths))

    def record(self) -> dict:
        """masks.json fields: target_macs (None for a latency budget) and, for one, the target and table."""
        if self.table is None:
            return {"target_macs": int(self.target)}
        d = self.table.data
        return {"target_macs": None, "target_latency_ms": self.target, "full_predicted_latency_ms": self.full,
                "latency_table_batch": d["batch"],
                "latency_table": {k: d[k] for k in ("backbone", "runtime", "device", "batch", "threads")}
                | {"source": self.table.source}}


def resolve_budget(target, arch: Network, min_channels: int = 1, channel_multiple: int = 1,
                   latency_table=None, floor: float | None = None) -> Budget:
    """A MACs budget (`resolve_target`), or a latency budget for a time target with a latency table."""
    latency = latency_target(target)
    if latency is None:
        return Budget(resolve_target(target, arch, min_channels, channel_multiple, floor), int(arch.macs()),
                      lowest=minimum_macs(arch, min_channels, channel_multiple, floor))
    if latency_table is None:
        raise PasError(f"target {target!r} is a latency; expected search.latency_table (a table from pas "
                       f"latency-table) to predict it, or a MACs target")
    from pas.latency_table import LatencyTable
    table = latency_table if isinstance(latency_table, LatencyTable) else LatencyTable.load(latency_table)
    table.check_network(arch)
    full = table.predict(arch, arch.full_widths())
    ms = latency[0] if latency[1] == "ms" else latency[0] / 100 * full
    lowest = table.predict(arch, WidthRule(arch, channel_multiple, min_channels, floor).minimum())
    if not lowest < ms < full:
        raise PasError(f"target {target!r} = {ms:g} ms is outside the range the table {table.source!r} predicts "
                       f"for {arch.backbone} ({table.describe()}): expected between {lowest:.4g} ms (narrowest "
                       f"widths{_floor_text(floor)}) and {full:.4g} ms (full network)")
    return Budget(ms, full, table, lowest)


def minimum_macs(arch: Network, min_channels: int = 1, channel_multiple: int = 1, floor: float | None = None) -> int:
    """MACs with every layer at its narrowest allowed width."""
    return int(arch.macs(WidthRule(arch, channel_multiple, min_channels, floor).minimum()))


def _floor_text(floor) -> str:
    return f", each group at floor {floor:g} of its width" if floor else ""


def resolve_target(target, arch: Network, min_channels: int = 1, channel_multiple: int = 1,
                   floor: float | None = None) -> int:
    """Absolute target MACs from '1.36G', '2.5M', 1360000000 (absolute) or '40%', 0.4 (fraction).

    A number in (0, 1] or a percentage is a fraction of the full network's MACs; a number above 1
    or a figure with a K/M/G suffix is absolute.
    """
    full = int(arch.macs())
    lowest = minimum_macs(arch, min_channels, channel_multiple, floor)
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
        multiple = f", widths multiples of {channel_multiple}" if channel_multiple > 1 else ""
        raise PasError(f"target {target!r} = {macs:.0f} MACs is below {lowest}, the MACs with "
                       f"{min_channels} channel(s) per layer{multiple}{_floor_text(floor)}; allowed range is "
                       f"({lowest}, {full})")
    return int(round(macs))


def check_objective(objective) -> None:
    if objective not in OBJECTIVES:
        raise PasError(f"objective {objective!r} is unknown; expected one of {', '.join(OBJECTIVES)}")


def check_penalty_gradient(penalty_gradient) -> None:
    if penalty_gradient not in PENALTY_GRADIENTS:
        raise PasError(f"penalty_gradient {penalty_gradient!r} is unknown; expected one of "
                       f"{', '.join(PENALTY_GRADIENTS)}")


class MacsPenalty(nn.Module):
    """alpha * ((MACs(b) - target) / MACs_full)^2, two-sided, differentiable through the gates: the
    paper's penalty (objective "paper").

    MACs(b) counts every layer at the nearest allowed width of its kept count (`rule`); the gradient
    flows through both widths of every layer, or only through its output width (module docstring).
    """

    def __init__(self, arch: Network, target_macs: int, alpha: float = DEFAULT_ALPHA, *,
                 rule: WidthRule | None = None, penalty_gradient: str = "both"):
        super().__init__()
        check_penalty_gradient(penalty_gradient)
        self.arch, self.target, self.alpha = arch, int(target_macs), float(alpha)
        self.full = int(arch.macs())
        self.rule = rule or WidthRule(arch)
        self.input_grad = penalty_gradient == "both"

    def measure(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(the budgeted cost, the MACs) of the gates' widths, differentiable."""
        kept = self.rule.estimate([g.kept() for g in gates_of(model)])
        macs = self.arch.gated_macs(kept, input_grad=self.input_grad)
        return macs, macs

    def forward(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        macs, _ = self.measure(model)
        return self.alpha * ((macs - self.target) / self.full) ** 2, macs


class LatencyPenalty(nn.Module):
    """alpha * ((T(b) - target) / (T_full - T_min))^2 with T the latency table's prediction (module
    docstring); returns the MACs of the same widths too, for the search's history."""

    def __init__(self, arch: Network, budget: Budget, alpha: float = DEFAULT_ALPHA, *,
                 rule: WidthRule | None = None, penalty_gradient: str = "both"):
        super().__init__()
        check_penalty_gradient(penalty_gradient)
        self.arch, self.budget, self.alpha = arch, budget, float(alpha)
        self.rule = rule or WidthRule(arch)
        self.input_grad = penalty_gradient == "both"

    def measure(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        kept = [k.double() for k in self.rule.estimate([g.kept() for g in gates_of(model)])]
        latency = self.budget.table.predict(self.arch, kept, input_grad=self.input_grad)
        return latency, self.arch.macs([k.detach() for k in kept])

    def forward(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        latency, macs = self.measure(model)
        span = self.budget.full - self.budget.lowest
        return self.alpha * ((latency - self.budget.target) / span) ** 2, macs


class BudgetConstraint(nn.Module):
    """The budget as a constraint (objective "constraint"): a price per unit of cost, set by a
    controller on the distance to the budget, instead of a penalty balanced against the loss.

    Every step the term is  u * (C(b) - C_t) / c,  with u a price that does not carry gradient, so a
    gate of a group whose channel costs dC/dn gets the push u * (dC/dn) / c: c is the mean cost of a
    searched channel of the full network, so a channel of average cost moves at the same speed in any
    network, large or small. u = lambda + gain * d with d = (C(b) - C_t) / (C_full - C_min) and lambda a
    Lagrange multiplier learned by gradient ascent (lambda += multiplier_lr * d while |d| is outside
    the tolerance band; CoFi, Xia et al. 2022): the gain answers the distance at once, the multiplier
    removes what is left of it, so the search ends on its budget and the landing moves little.
    C_t, the budget of step t, falls from C_full to the target over the first `ramp` of the steps on a
    cubic schedule (gradual pruning, Zhu and Gupta 2017): the distance stays small all along, so the
    multiplier never winds up on a long approach (which made the gates overshoot far below the
    budget and come back slowly). The multiplier and the step count live in the model's gates
    (`pas.gates.GateSet`) and resume with them.
    """

    def __init__(self, measure, budget: Budget, *, unit: float, gain: float, multiplier_lr: float, band: float,
                 ramp_steps: int):
        super().__init__()
        self.measure, self.budget, self.unit = measure, budget, float(unit)
        self.gain, self.multiplier_lr, self.band, self.ramp_steps = float(gain), float(multiplier_lr), band, ramp_steps

    def budget_at(self, step: torch.Tensor) -> torch.Tensor:
        full, target = float(self.budget.full), float(self.budget.target)
        if not self.ramp_steps:
            return torch.as_tensor(target, dtype=torch.float64, device=step.device)
        x = (step / self.ramp_steps).clamp(0, 1)
        return full - (full - target) * (1 - (1 - x) ** 3)

    def forward(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        cost, macs = self.measure(model)
        gates = getattr(model, GATES_ATTR)
        budget = self.budget_at(gates.steps)
        excess = cost.double() - budget
        d = excess.detach() / (float(self.budget.full) - float(self.budget.lowest))
        if torch.is_grad_enabled():  # a training step (tensor ops only: no host synchronisation)
            with torch.no_grad():
                gates.steps += 1
                gates.multiplier += self.multiplier_lr * torch.where(d.abs() > self.band, d, torch.zeros_like(d))
        price = gates.multiplier + self.gain * d
        return price * excess / self.unit, macs


@dataclass
class SearchResult:
    masks: list[torch.Tensor]
    target_macs: int | None  # None for a latency budget (`budget`)
    macs: int  # of the final masks, after the landing
    searched_macs: int  # of the masks the gates gave at the end of the search, at their nearest allowed widths
    history: list[dict]
    metrics: list[dict]
    landing: Landing  # what the landing moved (channels, MACs) from the gates' masks
    budget: Budget | None = None


def search(model: nn.Module, train_loader, *, target, example_input: torch.Tensor | None = None,
           epochs: int = 10, optim=None,
           alpha: float = DEFAULT_ALPHA, min_channels: int = 1, tolerance: float = DEFAULT_TOLERANCE,
           channel_multiple: int = 1, penalty_gradient: str = "both", latency_table=None,
           objective: str = "constraint", floor: float | None = None, gain: float = DEFAULT_GAIN,
           multiplier_lr: float = DEFAULT_MULTIPLIER_LR, ramp: float = DEFAULT_RAMP,
           history_every: int = 10, val_loader=None, seed: int = 0, state_path=None, fingerprint=None, on_epoch=None,
           world=None, progress: bool = False, trainer=None) -> SearchResult:
    """Train weights and DBC gates jointly on the task loss + the budget term, then land on the target.

    Works on any traceable CNN: a model built by `pas.models.build` carries its channel graph; any
    other module is traced on `example_input` (one batch, or one image's shape) first.
    `train_loader` is an iterable of (x, y) batches, or `train_loader(epoch)` returns one epoch's.
    Gates are attached if the model has none. On return the gates realise the final masks (also in
    `SearchResult.masks`); `pas.compact.compact(model)` then gives the compact network.
    `objective`: "constraint" (`BudgetConstraint`: a price from `gain` and a Lagrange multiplier learned
    at `multiplier_lr`, the budget ramped down over the first `ramp` of the steps; the landing ranks
    channels by importance per cost) or "paper" (the quadratic penalty `alpha` alone, the landing ranks
    by gate weight). `floor`: every group keeps at least this fraction of its width.
    `channel_multiple`: every width a multiple of it (`pas.landing`); `penalty_gradient`: "both" or
    "output" (module docstring). A time target ('3.5ms') needs `latency_table` (a path or a
    `pas.latency_table.LatencyTable`).
    `trainer(penalty=..., **kw)`: what trains the gated `model` (default: `pas.engine.Trainer` on the
    model, cross-entropy); a task that trains `model` inside other networks (`pas.translation`: a
    generator inside its CycleGAN) passes its own, with the same keywords as Trainer's but `model`.
    """
    check_penalty_gradient(penalty_gradient)
    check_objective(objective)
    if example_input is not None and not isinstance(getattr(model, "arch", None), Network):
        from pas.graph.network import describe
        describe(model, example_input)
    arch = network_of(model)
    rule = WidthRule(arch, channel_multiple, min_channels, floor)
    budget = resolve_budget(target, arch, min_channels, channel_multiple, latency_table, floor)
    if not callable(train_loader):
        batches = train_loader
        train_loader = lambda epoch: batches  # noqa: E731
    if not has_gates(model):
        attach_gates(model, min_channels=min_channels, floor=floor)
    quadratic = (LatencyPenalty(arch, budget, alpha, rule=rule, penalty_gradient=penalty_gradient) if budget.latency
                 else MacsPenalty(arch, int(budget.target), alpha, rule=rule, penalty_gradient=penalty_gradient))
    penalty = quadratic
    if objective == "constraint":
        full = arch.full_widths()
        unit = sum(f * c for f, c in zip(full, marginal_costs(arch, budget, full))) / sum(full)
        if not unit > 0:  # a latency table flat at full width (a tiny network): the mean slope over the range
            unit = (budget.full - budget.lowest) / (sum(full) - sum(rule.minimum()))
        band = tolerance * budget.target / (budget.full - budget.lowest)
        penalty = BudgetConstraint(quadratic.measure, budget, unit=unit, gain=gain,
                                   multiplier_lr=multiplier_lr, band=band,
                                   ramp_steps=int(ramp * epochs * _steps_per_epoch(train_loader)))
    make = trainer or (lambda **kw: Trainer(model, **kw))
    trainer = make(train_loader=train_loader, val_loader=val_loader, epochs=epochs,
                   optim=optim or OptimConfig(lr=0.02, schedule="constant"), seed=seed,
                   state_path=state_path, fingerprint=fingerprint, penalty=lambda _: penalty(model),
                   on_epoch=on_epoch, world=world, progress=progress)

    def record(epoch, step, macs):
        n = len(trainer.history)
        if step % history_every == 0:  # the widths after the step, and the MACs of those widths
            kept = kept_widths(model)
            trainer.history.append({"epoch": epoch + 1, "step": step, "record": n,
                                    "macs": int(arch.macs(rule.nearest(kept))), "kept": kept,
                                    "multiplier": float(getattr(model, GATES_ATTR).multiplier)})

    trainer.on_step = record
    metrics = trainer.fit()
    gates = gates_of(model)
    current = [g.mask().detach() > 0.5 for g in gates]
    scores = ([g.weight for g in gates] if objective == "paper"
              else importance_per_cost(model, budget, [int(m.sum()) for m in current]))
    landing = land(arch, current, scores, budget.target, channel_multiple=channel_multiple,
                   tolerance=tolerance, min_channels=min_channels, floor=floor, cost=budget.cost(arch))
    set_masks(model, landing.masks, min_channels=min_channels)
    return SearchResult(landing.masks, None if budget.latency else int(budget.target), landing.macs,
                        landing.macs_before, trainer.history, metrics, landing, budget)


def _steps_per_epoch(train_loader) -> int:
    """Steps of the first epoch (0 when the loader cannot tell: no ramp then)."""
    try:
        return len(train_loader(0))
    except TypeError:
        return 0


def marginal_costs(arch: Network, budget: Budget, widths) -> list[float]:
    """d cost / d width of every searched group at these widths: the MACs (or the predicted latency)
    one more channel of the group costs, through every layer that reads or writes it."""
    kept = [torch.tensor(float(w), dtype=torch.float64, requires_grad=True) for w in widths]
    cost = budget.table.predict(arch, kept) if budget.latency else arch.macs(kept)
    grads = torch.autograd.grad(cost, kept, allow_unused=True)
    return [float(g) if g is not None else 0.0 for g in grads]


def importance_per_cost(model: nn.Module, budget: Budget, widths) -> list[torch.Tensor]:
    """Every channel's accumulated task-loss importance (`pas.gates.DBCGate.importance`) divided by
    what one channel of its group costs at these widths: the landing then trades channels as a
    knapsack would (HALP), not by raw gate value. Summed over the processes of a distributed run."""
    arch = network_of(model)
    importance = [g.importance.detach().clone() for g in gates_of(model)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in importance:
            torch.distributed.all_reduce(t)
    costs = marginal_costs(arch, budget, widths)
    tiny = min((c for c in costs if c > 0), default=1.0) * 1e-6
    return [imp.cpu().double() / max(c, tiny) for imp, c in zip(importance, costs)]
