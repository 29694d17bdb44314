"""PaS: the gate's estimator, gated MACs, compaction, targets, baselines, a real short search."""
import pytest
import torch
from torch import nn

import pas.models as M
from pas.compact import compact
from pas.errors import PasError
from pas.flops import ptflops_macs
from pas.gates import DBCGate, attach_gates, freeze_gates, gated_macs, gates_of, set_masks
from pas.pruners import prune
from pas.landing import adjust_masks
from pas.search import MacsPenalty, resolve_target, search
from tests.helpers import random_masks, randomize_bn, rel_err

SMALL = {"in_channels": 1, "resolution": 28, "num_classes": 10}
SEARCHABLE = ["repvgg_a0_mini", "repvgg_b1_mini", "mobilenetv2_mini", "repvgg_a0", "mobilenetv2_050",
              "repvgg_b1g2", "repvgg_b1g4", "repvgg_b2g4"]


def kwargs(name):
    return SMALL if name.endswith("_mini") else {"in_channels": 3, "resolution": 40, "num_classes": 10}


def test_estimator_gradient_is_identity_and_a_pruned_gate_revives():
    gate = DBCGate(4)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([1.0, 0.6, 0.4, -0.3]))
    x = torch.ones(1, 4, 1, 1)
    y = gate(x)
    assert y.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    upstream = torch.tensor([0.3, -2.0, -5.0, 7.0]).view(1, 4, 1, 1)
    (y * upstream).sum().backward()
    assert torch.equal(gate.weight.grad, upstream.flatten())  # dL/dv = dL/db, no clipping window
    opt = torch.optim.SGD([gate.weight], lr=0.1)
    opt.step()  # v = 0.4 - 0.1 * (-5) = 0.9: the pruned channel comes back
    assert gate.mask().tolist() == [1.0, 1.0, 1.0, 0.0]


def test_min_channels_keeps_the_strongest():
    gate = DBCGate(5, min_channels=2)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([0.1, 0.45, -1.0, 0.3, 0.2]))
    assert gate.mask().tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_gates_on_every_block_and_every_expansion():
    rep = M.build("repvgg_b1")
    assert len(attach_gates(rep)) == 28
    mb = M.build("mobilenetv2_100")
    assert [g.weight.numel() for g in attach_gates(mb)] == mb.arch.searchable_widths()
    assert len(gates_of(mb)) == 16  # every block but the first, which has no expansion
    # grouped convs (layers 2, 4, ..., 26) keep their groups: every layer they read or write is
    # searched in 2 equal blocks (layer 1 is read by layer 2; the stem and the last layer are not)
    g2 = M.arch_for("repvgg_b1g2")
    assert g2.group_names() == [f"blocks.{i}" for i in range(28)]
    assert g2.blocks() == [1] + [2] * 26 + [1]


@pytest.mark.parametrize("name", SEARCHABLE)
def test_compact_equals_masked_and_macs_agree_three_ways(name):
    kw = kwargs(name)
    model = randomize_bn(M.build(name, **kw)).eval()
    masks = random_masks(model.arch.full_widths(), model.arch.blocks())
    set_masks(model, masks)
    x = torch.randn(2, kw["in_channels"], kw["resolution"], kw["resolution"])
    small = compact(model).eval()
    with torch.no_grad():
        assert rel_err(model(x), small(x)) <= 1e-4
    assert small.arch.searchable_widths() == [int(m.sum()) for m in masks]
    assert int(gated_macs(model)) == small.arch.macs() == ptflops_macs(small, kw["in_channels"], kw["resolution"])


def test_gated_macs_is_differentiable_through_both_factors():
    model = M.build("repvgg_a0_mini", **SMALL)
    gates = attach_gates(model)
    gated_macs(model).backward()
    widths, sizes = model.arch.searchable_widths(), model.arch.searchable_sizes()
    assert sizes == [14, 14, 7, 7, 4, 4, 4, 2]  # 28 -> 14 (stem) -> 14 -> 7 -> 4 -> 2
    # dMACs/dv of one channel of layer 1 = (C_0 * 9 * H1^2 + C_2 * 9 * H2^2) (it is input and output)
    expected = widths[0] * 9 * sizes[1] ** 2 + widths[2] * 9 * sizes[2] ** 2
    assert gates[1].weight.grad[0].item() == pytest.approx(expected)


def test_freeze_fixes_masks():
    model = M.build("repvgg_a0_mini", **SMALL)
    attach_gates(model)
    freeze_gates(model)
    assert all(not g.weight.requires_grad for g in gates_of(model))


def test_targets_and_their_errors():
    arch = M.arch_for("repvgg_b1")
    full = arch.macs()
    assert resolve_target("1.36G", arch) == 1_360_000_000
    assert resolve_target("50%", arch) == round(full / 2)
    assert resolve_target(0.25, arch) == round(full / 4)
    assert resolve_target(3.06e9, arch) == 3_060_000_000
    with pytest.raises(PasError, match=rf"is not below the full network's {full} MACs; allowed range is \(\d+, {full}\)"):
        resolve_target("12G", arch)
    with pytest.raises(PasError, match="must be positive"):
        resolve_target(-1, arch)
    with pytest.raises(PasError, match=r"below \d+, the MACs with 1 channel\(s\) per layer"):
        resolve_target(1000, arch)
    with pytest.raises(PasError, match="not a MACs figure"):
        resolve_target("lots", arch)


def test_penalty_is_scale_free_and_two_sided():
    model = M.build("repvgg_b1")
    arch = model.arch
    attach_gates(model)
    pen = MacsPenalty(arch, resolve_target("1.36G", arch), alpha=14.0)
    value, macs = pen(model)
    full = 11_815_485_440  # ptflops' count of the deployed B1 at 224 (the paper's 11.81 G + the 2048x1000 classifier)
    assert int(macs) == full
    # 14 * ((11.815 - 1.36) / 11.815)^2, i.e. the paper's 0.1 * (11.815 - 1.36)^2 / 11.815^2 * 14
    assert float(value.detach()) == pytest.approx(14 * ((full - 1.36e9) / full) ** 2, rel=1e-6)


@pytest.mark.parametrize("method", ["uniform", "bn_gamma", "l1"])
@pytest.mark.parametrize("name", ["repvgg_b1_mini", "mobilenetv2_mini"])
def test_baselines_land_within_one_percent(method, name):
    """The compact network the masks give, counted by ptflops, is within 1% below the target."""
    model = randomize_bn(M.build(name, **SMALL))
    target = resolve_target("40%", model.arch)
    masks = prune(method, model, target)
    set_masks(model, masks)
    assert target * 0.99 <= ptflops_macs(compact(model.eval()).eval(), 1, 28) <= target
    if method == "uniform":  # one factor: every layer keeps about the same fraction
        fracs = [int(m.sum()) / m.numel() for m in masks]
        assert max(fracs) - min(fracs) < 0.35


def test_bn_gamma_ranks_globally():
    model = M.build("repvgg_a0_mini", **SMALL)
    for i, block in enumerate(model.blocks):  # layer 2 has the smallest gammas: pruned first
        for bn in (block.rbr_dense[1], block.rbr_1x1[1]):
            bn.weight.data.fill_(0.01 if i == 2 else 1.0)
    masks = prune("bn_gamma", model, resolve_target("85%", model.arch))
    kept = [int(m.sum()) for m in masks]
    assert kept[2] < model.arch.searchable_widths()[2]
    others_whole = all(k == w for i, (k, w) in enumerate(zip(kept, model.arch.widths)) if i != 2)
    assert others_whole or kept[2] == 1  # nothing else goes before layer 2 is down to its minimum


def test_adjust_flips_channels_nearest_the_threshold():
    arch = M.arch_for("repvgg_a0_mini", **SMALL)
    scores = [torch.linspace(0.0, 1.0, w) for w in arch.searchable_widths()]
    masks = [s > 0.5 for s in scores]
    target = int(arch.macs([int(m.sum()) for m in masks]) * 0.97)
    out = adjust_masks(arch, masks, scores, target)
    dropped = [(li, j) for li, (a, b) in enumerate(zip(masks, out)) for j in range(len(a)) if a[j] and not b[j]]
    assert dropped, "something had to be dropped"
    # only channels just above the 0.5 threshold move; confident ones (score >= 0.6) all stay
    assert max(float(scores[li][j]) for li, j in dropped) < 0.6
    assert all(bool(b[j]) for a, b, s in zip(masks, out, scores) for j in range(len(a)) if s[j] >= 0.6)


def test_the_trainers_optimizer_decays_every_weight_and_gate_and_scales_the_gate_lr():
    """The optimizer pas.engine.Trainer builds: every trainable parameter, the DBC gate weights included,
    is decayed with optim.weight_decay; the gates have their own group at gate_lr_scale times the lr;
    frozen gates (fine-tune) are in no group, so they get no decay."""
    from pas.engine import OptimConfig, Trainer
    model = M.build("repvgg_a0_mini", **SMALL)
    attach_gates(model)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    optim = OptimConfig(lr=0.1, schedule="constant", gate_lr_scale=10.0, momentum=0.0, weight_decay=0.25)
    trainer = Trainer(model, train_loader=lambda epoch: [(x, y)], epochs=1, optim=optim)
    groups = trainer.optimizer.param_groups
    gate_params = {id(g.weight) for g in gates_of(model)}
    network_params = {id(p) for n, p in model.named_parameters() if not n.startswith("pas_gates.")}
    assert len(gate_params) == 8 and len(network_params) > 8
    assert sorted(({id(p) for p in g["params"]} == gate_params, g["weight_decay"]) for g in groups) == \
        [(False, 0.25), (True, 0.25)]
    assert {id(p) for g in groups for p in g["params"]} == gate_params | network_params
    before = [g.weight.detach().clone() for g in gates_of(model)]
    trainer.fit()
    assert sorted(g["lr"] for g in groups) == pytest.approx([0.1, 1.0])
    # one plain SGD step: every gate weight moves by lr_gate * (its gradient + weight_decay * itself)
    for b, g in zip(before, gates_of(model)):
        assert torch.allclose(b - g.weight.detach(), 1.0 * (g.weight.grad + 0.25 * b), atol=1e-6)
    freeze_gates(model)
    frozen = Trainer(model, train_loader=lambda epoch: [(x, y)], epochs=1, optim=optim).optimizer.param_groups
    assert [({id(p) for p in g["params"]}, g["weight_decay"]) for g in frozen] == [(network_params, 0.25)]


def test_tag_overrides_accumulate():
    from pas.config import load_config
    cfg = load_config(None, ["tags.variant=PaS-A", "tags.target=40%", "optim.lr=0.05"])
    assert cfg["tags"] == {"variant": "PaS-A", "target": "40%"} and cfg["optim"]["lr"] == 0.05


def test_landing_swaps_channels_when_only_expensive_ones_were_dropped():
    """Raw L1 norms of a randomly initialised repvgg_b0_mini (they grow with fan-in) drop only
    channels of expensive layers on the way to 1.0M MACs: adding any of them back overshoots and the
    greedy pass alone ends 1.05% short. Swapping a dropped channel in and a kept channel of another
    layer out lands within 1%."""
    from pas.pruners import filter_l1
    torch.manual_seed(0)
    model = M.build("repvgg_b0_mini", num_classes=10, in_channels=1, resolution=28)
    arch, target = model.arch, 1_000_000
    everything = [torch.ones(w, dtype=torch.bool) for w in arch.searchable_widths()]
    scores = filter_l1(model)
    with pytest.raises(PasError, match=r"cannot reach target 1000000 MACs within 1.0%: the closest mask gives 989548"):
        adjust_masks(arch, everything, scores, target, max_swaps=0)
    set_masks(model, adjust_masks(arch, everything, scores, target))
    assert 0.99 * target <= ptflops_macs(compact(model.eval()).eval(), 1, 28) <= target


def test_amp_loss_scale_survives_a_resume(tmp_path):
    """The state file carries the GradScaler's adapted scale and growth tracker: a resumed AMP run
    does not restart at 65536 and skip steps to find it again. (AMP runs on CUDA only; the scaler's
    state is device-independent, so a CPU scaler stands in for it here.)"""
    from pas.engine import OptimConfig, Trainer
    model = M.build("repvgg_a0_mini", **SMALL)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))

    def trainer(epochs):
        t = Trainer(model, train_loader=lambda epoch: [(x, y)], epochs=epochs, optim=OptimConfig(lr=0.01),
                    state_path=tmp_path / "state.pt")
        t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=1)
        return t

    first = trainer(3)
    first.fit()
    assert first.scaler.get_scale() == 2.0 ** 19  # grown once per finite step: 3 steps
    resumed = trainer(3)
    assert resumed.load_state() and resumed.start_epoch == 3
    assert resumed.scaler.get_scale() == 2.0 ** 19
    assert resumed.scaler.state_dict() == first.scaler.state_dict()


class _TwoLayers(nn.Module):
    """conv1 (3 -> 4, 3x3) on 8x8, conv2 (4 -> 6, 3x3, stride 2) to 4x4, pool, fc (6 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("penalty_gradient", ["output", "both"])
def test_penalty_gradient_through_the_output_width_or_both(penalty_gradient):
    """MACs(n1, n2) = 3*n1*9*64 + n1*n2*9*16 + n2*2 = 1728 n1 + 144 n1 n2 + 2 n2 (full: 10380).
    At n1 = 3, n2 = 5: MACs = 5184 + 2160 + 10 = 7354; target 5190, alpha 14:
    dP/dMACs = 2 * 14 * (7354 - 5190) / 10380^2. Straight-through, each gate weight of a layer gets
    dP/dMACs * dMACs/dn:  output: dMACs/dn1 = 1728 (conv2's input factor detached), dMACs/dn2 = 144*3
    (the classifier's input detached);  both: 1728 + 144*5 and 144*3 + 2."""
    from pas.graph.network import describe
    model = _TwoLayers()
    describe(model, (3, 8, 8))
    gates = attach_gates(model)
    with torch.no_grad():
        gates[0].weight[3] = 0.2
        gates[1].weight[5] = 0.2
    value, macs = MacsPenalty(model.arch, 5190, alpha=14.0, penalty_gradient=penalty_gradient)(model)
    assert int(macs) == 7354
    value.backward()
    outer = 2 * 14 * (7354 - 5190) / 10380 ** 2
    d1, d2 = (1728, 144 * 3) if penalty_gradient == "output" else (1728 + 144 * 5, 144 * 3 + 2)
    assert gates[0].weight.grad.tolist() == pytest.approx([outer * d1] * 4, rel=1e-6)
    assert gates[1].weight.grad.tolist() == pytest.approx([outer * d2] * 6, rel=1e-6)


def test_penalty_gradient_must_be_known():
    with pytest.raises(PasError, match=r"penalty_gradient 'input' is unknown; expected one of both, output"):
        MacsPenalty(M.arch_for("repvgg_a0_mini", **SMALL), 10, penalty_gradient="input")
    from pas.config import load_config
    assert load_config(None, [])["search"]["penalty_gradient"] == "both"
    with pytest.raises(PasError, match=r"key 'search.penalty_gradient' must be one of both, output, got 'input'"):
        load_config(None, ["search.penalty_gradient=input"])


class _Stack(nn.Module):
    """Plain 3x3/1x1 convs of fan-in 27, 64, 576, 1152 and 128 (widths 64, 64, 128, 128, 96)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for w, k in zip((64, 64, 128, 128, 96), (3, 1, 3, 3, 1)):
            layers += [nn.Conv2d(c, w, k, padding=k // 2, bias=False), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_l1_keeps_about_the_same_share_of_layers_with_equally_distributed_weights(seed):
    """Every weight drawn from U(-1, 1), whatever the layer's fan-in: nothing tells the layers apart,
    so a fair magnitude criterion keeps about the same share of each (measured spread <= 0.1 over
    seeds 0-4). Raw L1 norms grow with fan-in: they keep the 1152-fan-in layer whole, most of the
    576-fan-in one, and cut the others to a few channels."""
    from pas.graph.network import describe
    from pas.pruners import filter_l1, magnitude_masks
    torch.manual_seed(seed)
    model = _Stack()
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.weight, -1.0, 1.0)
    describe(model, (3, 8, 8))
    target = resolve_target("50%", model.arch)
    shares = [int(m.sum()) / m.numel() for m in prune("l1", model, target)]
    assert max(shares) - min(shares) <= 0.12, shares
    raw = [int(m.sum()) / m.numel() for m in magnitude_masks(model, target, filter_l1(model)).masks]
    assert raw[2] >= 0.75 and raw[3] == 1.0 and max(raw[0], raw[1], raw[4]) <= 0.1, raw


@pytest.mark.parametrize("name", ["repvgg_b1g2", "repvgg_b1g4", "repvgg_b2g4"])
def test_grouped_members_search_land_and_compact(name):
    """A short search (4 steps on random images at 32 px) lands every grouped member on its target
    with every layer next to a grouped conv in whole groups; the compact network is the masked one."""
    torch.manual_seed(0)
    kw = {"in_channels": 3, "resolution": 32, "num_classes": 10}
    model = randomize_bn(M.build(name, **kw))
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(4)]
    result = search(model, batches, target="45%", epochs=1)
    widths, blocks = [int(m.sum()) for m in result.masks], model.arch.blocks()
    assert blocks == [1] + [int(name[-1])] * 26 + [1]
    for mask, b in zip(result.masks, blocks):  # the same count in every block
        assert len(set(mask.view(b, -1).sum(1).tolist())) == 1
    small = compact(model.eval()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), small(x)) <= 1e-4
    assert small.arch.searchable_widths() == widths
    macs = ptflops_macs(small, 3, 32)
    assert macs == result.macs and result.target_macs * 0.99 <= macs <= result.target_macs
    assert sum(p.numel() for p in small.parameters()) == small.arch.params()
