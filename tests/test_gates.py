"""Where the DBC gates sit, and what they hear.

A removed channel can come back only if its gate still gets the task loss's gradient: dL/db =
sum x dL/dy with x the channel's real activation. That holds where the gate sits after the group's
activation and no second mask of the group cuts its path; before a ReLU (relu'(0) = 0) it is zero.
Oracles: the placement read by hand from torchvision's and our blocks' code, the gradients of
autograd, and hand-computed floors and marginal MACs.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pas import models as M
from pas.gates import attach_gates, gates_of
from pas.graph.network import describe
from pas.landing import WidthRule, check_floor, group_floors
from pas.pruners import run_pruner
from pas.search import Budget, BudgetConstraint, MacsPenalty, marginal_costs, resolve_target, search
from tests.helpers import randomize_bn

SMALL = dict(num_classes=10, in_channels=1, resolution=28)


class TwoReaders(nn.Module):
    """A group read by a depth-wise path and by a second conv: its mask cannot move past the
    branching, so the depth-wise path gets a forward-only mask of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.dw_act = nn.ReLU()
        self.pw = nn.Conv2d(8, 6, 1)
        self.side = nn.Conv2d(8, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        a = self.act(self.bn(self.conv(x)))
        b = self.pw(self.dw_act(self.dw_bn(self.dw(a))))
        c = self.side(a)
        return self.fc(torch.cat([torch.flatten(self.pool(b), 1), torch.flatten(self.pool(c), 1)], 1))


def _switch_off_half(gates, seed=1):
    g = torch.Generator().manual_seed(seed)
    for gate in gates:
        with torch.no_grad():
            off = torch.rand(gate.weight.shape, generator=g) < 0.5
            off[0] = False
            gate.weight[off] = 0.0


def _task_loss(out: torch.Tensor, classes: int) -> torch.Tensor:
    if out.dim() == 2 and out.shape[1] == classes:
        return nn.functional.cross_entropy(out, torch.arange(out.shape[0]) % classes)
    return out.square().mean()  # a dense output (YOLACT's flat predictions, a generator's image)


FAMILIES = [("repvgg_b0_mini", 28, 1), ("mobilenetv2_mini_035", 28, 1), ("resnet26_mini", 28, 1),
            ("torchvision:resnet18", 32, 3), ("torchvision:mobilenet_v2", 32, 3), ("yolact_mini", 64, 1),
            ("resnet_generator_mini", 32, 1), ("mobile_resnet_generator_mini", 32, 1), ("user", 28, 1)]


@pytest.mark.parametrize("name,side,channels", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_searched_group_hears_the_loss_on_its_removed_channels(name, side, channels):
    torch.manual_seed(0)
    if name == "user":
        model = TwoReaders()
        describe(model, (1, side, side))
    else:
        model = M.build(name, num_classes=10, in_channels=channels, resolution=side)
    randomize_bn(model)
    gates = attach_gates(model)
    _switch_off_half(gates)
    model.train()
    _task_loss(model(torch.randn(8, channels, side, side)), 10).backward()
    heard = total = 0
    for gate, group in zip(gates, model.arch.group_names()):
        off = gate.weight.detach() <= 0.5
        grads = gate.weight.grad[off]
        assert (grads != 0).any(), f"no removed channel of {group} hears the loss"
        heard, total = heard + int((grads != 0).sum()), total + int(off.sum())
    # a channel whose ReLU is off on the whole batch legitimately hears nothing
    assert heard >= 0.95 * total, (heard, total)


def _points(model):
    return {(p.module, p.call): p for p in model.arch.graph.mask_points}


def test_gates_sit_after_the_activation_read_from_the_blocks_code():
    """torchvision's BasicBlock calls `self.relu` twice: after bn1 (the inner group) and after the
    residual add (the trunk); our MobileNetV2 block is expand -> depthwise -> project, each a fused
    conv-BN-ReLU6 leaf: the hidden group is masked once, after the depth-wise ReLU6."""
    resnet = M.build("torchvision:resnet18", num_classes=10, in_channels=3, resolution=32)
    points = _points(resnet)
    inner, trunk = points[("layer1.0.relu", 0)], points[("layer1.0.relu", 1)]
    assert inner.after_activation and inner.grad and inner.calls == 2 and inner.site == "layer1.0.bn1"
    assert trunk.after_activation and trunk.site in ("layer1.0.bn2", "layer1.0.downsample.1")
    assert ("layer2.0.relu", 1) in points  # the downsampling block's BN and its shortcut's end at one point
    assert not any(p.module.endswith(("bn1", "bn2")) for p in points.values())

    mbv2 = M.build("mobilenetv2_mini_035", **SMALL)
    hidden = [p for p in mbv2.arch.graph.mask_points if p.site.endswith(".expand")]
    assert hidden and all(p.module.endswith(".depthwise") and p.grad and p.after_activation for p in hidden)
    # one mask per hidden group: no second mask cuts the gate's gradient path
    assert len({p.module for p in mbv2.arch.graph.mask_points if ".expand" in p.site or ".depthwise" in p.site}) \
        == len(hidden)


def test_a_forward_only_mask_zeroes_values_and_passes_the_gradient():
    model = TwoReaders()
    describe(model, (1, 28, 28))
    points = _points(model)
    assert points[("act", 0)].grad and not points[("dw_act", 0)].grad
    gates = attach_gates(model)
    gate = gates[model.arch.group_names().index("conv")]
    _switch_off_half(gates)
    off = gate.weight.detach() <= 0.5
    seen = {}
    model.dw_act.register_forward_hook(lambda m, a, out: seen.setdefault("dw", out))
    model.train()
    out = model(torch.randn(4, 1, 28, 28))
    assert seen["dw"][:, off].abs().sum() == 0  # the second mask zeroed what the BN shifted
    # the loss reads the depth-wise path only: what the removed channels hear comes through the
    # forward-only mask, which would be zero if it cut the path
    out[:, :6].sum().backward()
    assert (gate.weight.grad[off] != 0).all()


def test_the_compact_network_equals_the_masked_one_for_the_user_network():
    from pas.compact import compact
    torch.manual_seed(0)
    model = randomize_bn(TwoReaders())
    describe(model, (1, 28, 28))
    _switch_off_half(attach_gates(model))
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)
    small = compact(model).eval()
    assert small.arch.searchable_widths() == [int((g.weight > 0.5).sum()) for g in gates_of(model)]
    torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)


# -- the floor -----------------------------------------------------------------------------------
def test_floors_by_hand():
    arch = M.arch_for("mobilenetv2_mini_035", **SMALL)
    full = arch.full_widths()
    assert group_floors(arch, 1, 0.1) == [max(1, math.ceil(0.1 * f)) for f in full]
    assert group_floors(arch, 1, 0.25)[:2] == [math.ceil(0.25 * full[0]), math.ceil(0.25 * full[1])]
    assert group_floors(arch, 5, 0.01) == [min(5, f) for f in full]
    rule = WidthRule(arch, 8, 1, 0.3)
    for allowed, f in zip(rule.allowed, full):
        assert min(allowed) >= min(math.ceil(0.3 * f), f) and all(w % 8 == 0 or w == f for w in allowed)
    for bad in (0, -0.1, 1.5, "half", True):
        with pytest.raises(Exception, match="floor"):
            check_floor(bad)


@pytest.mark.parametrize("method", ["pas", "uniform", "bn_gamma", "l1"])
def test_search_landing_and_every_baseline_honour_the_floor(method):
    torch.manual_seed(0)
    model = randomize_bn(M.build("mobilenetv2_mini_035", **SMALL))
    floor = 0.3
    target = resolve_target("45%", model.arch, floor=floor)
    if method == "pas":
        batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(4)]
        masks = search(model, batches, target=target, epochs=2, floor=floor, alpha=200.0).masks
    else:
        masks = run_pruner(method, model, target, floor=floor).masks
    for m, f in zip(masks, model.arch.full_widths()):
        assert int(m.sum()) >= math.ceil(floor * f), ([int(m.sum()) for m in masks], model.arch.full_widths())
    assert int(model.arch.macs([int(m.sum()) for m in masks])) <= target


def test_a_target_below_what_the_floor_allows_is_refused():
    arch = M.arch_for("repvgg_b0_mini", **SMALL)
    with pytest.raises(Exception, match=r"below .*floor 0.9.*allowed range"):
        resolve_target("50%", arch, floor=0.9)


# -- the budget as a constraint ------------------------------------------------------------------
def test_the_constraint_prices_every_channel_by_its_cost_and_learns_its_multiplier():
    torch.manual_seed(0)
    model = M.build("repvgg_b0_mini", **SMALL)
    gates = attach_gates(model)
    full = int(model.arch.macs())
    target = full // 2
    budget = Budget(target, full)
    unit = 1234.5
    constraint = BudgetConstraint(MacsPenalty(model.arch, target).measure, budget, unit=unit,
                                  gain=2.0, multiplier_lr=0.5, band=0.01, ramp_steps=0)
    loss, macs = constraint(model)
    d = (full - target) / full  # every gate on: the full network's MACs
    assert float(model.pas_gates.multiplier) == pytest.approx(0.5 * d)
    assert float(model.pas_gates.steps) == 1
    price = 0.5 * d + 2.0 * d
    assert float(loss) == pytest.approx(price * (full - target) / unit)
    loss.backward()
    # the push on a gate: the price times what one more channel of its group costs, per unit
    costs = marginal_costs(model.arch, budget, model.arch.full_widths())
    for gate, cost in zip(gates, costs):
        torch.testing.assert_close(gate.weight.grad, torch.full_like(gate.weight, price * cost / unit))
    with torch.no_grad():
        constraint(model)  # an evaluation pass moves neither the multiplier nor the step count
    assert float(model.pas_gates.multiplier) == pytest.approx(0.5 * d) and float(model.pas_gates.steps) == 1
    inside = BudgetConstraint(MacsPenalty(model.arch, int(full / 1.005)).measure, Budget(int(full / 1.005), full),
                              unit=unit, gain=2.0, multiplier_lr=0.5, band=0.01, ramp_steps=0)
    inside(model)  # 0.5% over the budget, inside the 1% band: the multiplier holds
    assert float(model.pas_gates.multiplier) == pytest.approx(0.5 * d)


def test_the_budget_ramps_down_on_a_cubic_schedule():
    model = M.build("repvgg_b0_mini", **SMALL)
    full = int(model.arch.macs())
    budget = Budget(full // 4, full)
    ramp = BudgetConstraint(None, budget, unit=1.0, gain=1.0, multiplier_lr=0.0, band=0.0,
                            ramp_steps=10)
    at = [float(ramp.budget_at(torch.tensor(float(step), dtype=torch.float64))) for step in (0, 5, 10, 20)]
    drop = full - full // 4
    assert at == pytest.approx([full, full - drop * (1 - 0.5 ** 3), full // 4, full // 4])


def test_marginal_macs_of_a_tiny_network_by_hand():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x)))
            x = torch.relu(self.b2(self.c2(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    arch = describe(Tiny(), (1, 28, 28))
    budget = Budget(1, int(arch.macs()))
    # at widths (5, 9): d/d n1 = 1*9*28*28 (c1 writes it) + 9*9*14*14 (c2 reads it);
    # d/d n2 = 5*9*14*14 (c2 writes it) + 10 (the classifier reads it)
    assert marginal_costs(arch, budget, [5, 9]) == [9 * 784 + 9 * 9 * 196, 5 * 9 * 196 + 10]


def test_the_default_objective_lands_by_importance_per_cost_and_the_paper_form_by_gate_weight(monkeypatch):
    import pas.search as S
    seen = {}
    real = S.land

    def spy(arch, masks, scores, target, **kw):
        seen.update(scores=[s.detach().double().clone() for s in scores], widths=[int(m.sum()) for m in masks],
                    weights=[g.weight.detach().double().clone() for g in gates_of(model)],
                    importance=[g.importance.detach().double().clone() for g in gates_of(model)])
        return real(arch, masks, scores, target, **kw)

    monkeypatch.setattr(S, "land", spy)
    torch.manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    model = M.build("repvgg_b0_mini", **SMALL)
    search(model, batches, target="60%", epochs=1, objective="paper")
    assert all(torch.equal(s, w) for s, w in zip(seen["scores"], seen["weights"]))
    model = M.build("repvgg_b0_mini", **SMALL)
    search(model, batches, target="60%", epochs=1)
    costs = marginal_costs(model.arch, Budget(1, int(model.arch.macs())), seen["widths"])
    assert all((imp > 0).all() for imp in seen["importance"])  # every channel heard the loss
    for score, imp, cost in zip(seen["scores"], seen["importance"], costs):
        torch.testing.assert_close(score, imp / cost)


def test_a_cost_flat_at_full_width_still_prices_the_channels(monkeypatch):
    """A latency table of a tiny network can be flat at full width (every marginal cost 0, measured
    on this machine under load): the constraint then prices a channel by the mean slope over the
    range, where a zero unit made the first step's loss nan."""
    import pas.search as S
    monkeypatch.setattr(S, "marginal_costs", lambda arch, budget, widths: [0.0] * len(widths))
    torch.manual_seed(0)
    model = M.build("repvgg_b0_mini", **SMALL)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    seen = {}
    real = S.BudgetConstraint.__init__

    def spy(self, *args, **kw):
        seen["unit"] = kw["unit"]
        real(self, *args, **kw)

    monkeypatch.setattr(S.BudgetConstraint, "__init__", spy)
    result = search(model, batches, target="60%", epochs=1)
    budget = result.budget
    span = sum(model.arch.full_widths()) - sum(WidthRule(model.arch).minimum())
    assert seen["unit"] == pytest.approx((budget.full - budget.lowest) / span)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.metrics)
