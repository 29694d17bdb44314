"""The generic mechanism: channel groups of any traced CNN, MACs and params from the graph, one
compaction. Oracles: ptflops, Torch-Pruning's dependency graph, torchvision's own figures, the
stored results of the per-family code (tests/data), hand-computed cases."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pas.models as M
from pas.compact import compact
from pas.errors import PasError
from pas.flops import ptflops_macs
from pas.gates import attach_gates, gated_macs, set_masks
from pas.graph.network import describe
from tests.helpers import random_masks, randomize_bn, rel_err

SMALL = {"in_channels": 1, "resolution": 28, "num_classes": 10}
RGB64 = {"in_channels": 3, "resolution": 64, "num_classes": 10}
NETWORKS = {  # every network the issue lists, at a size that keeps the test short
    "resnet18": RGB64, "resnet34": RGB64, "resnet50": {"in_channels": 3, "resolution": 224, "num_classes": 1000},
    "resnet10_mini": SMALL, "resnet18_mini": SMALL, "resnet26_mini": SMALL,
    "torchvision:resnet50": RGB64, "torchvision:mobilenet_v3_small": RGB64,
    "torchvision:efficientnet_b0": RGB64, "torchvision:regnet_y_400mf": RGB64,
    # concatenations: DenseNet (with pre-activation BNs on the concatenated features), GoogLeNet
    "torchvision:densenet121": RGB64, "torchvision:googlenet": RGB64,
}
DATA = "tests/data/family_regression"


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_macs_equal_ptflops_and_compact_equals_masked(name):
    kw = NETWORKS[name]
    model = randomize_bn(M.build(name, **kw)).eval()
    net = model.arch
    x = torch.randn(2, kw["in_channels"], kw["resolution"], kw["resolution"])
    full = compact(model, [torch.ones(w, dtype=torch.bool) for w in net.full_widths()]).eval()
    assert ptflops_macs(full, kw["in_channels"], kw["resolution"]) == net.macs()
    assert sum(p.numel() for p in full.parameters()) == net.params()
    with torch.no_grad():
        assert rel_err(model(x), full(x)) <= 1e-5
    for seed in range(3):
        masks = random_masks(net.full_widths(), net.blocks(), seed=seed, p=0.6)
        set_masks(model, masks)
        small = compact(model).eval()
        widths = [int(m.sum()) for m in masks]
        assert small.arch.widths == tuple(widths)
        assert int(gated_macs(model)) == net.macs(widths) == small.arch.macs() \
            == ptflops_macs(small, kw["in_channels"], kw["resolution"]), seed
        assert sum(p.numel() for p in small.parameters()) == small.arch.params()
        with torch.no_grad():
            assert rel_err(model(x), small(x)) <= 1e-5, seed


def test_resnet_figures_match_torchvision():
    import torchvision
    net = M.arch_for("resnet50")
    assert net.macs() == 4_089_184_256  # "4.1 GMACs" (ptflops convention, with the classifier)
    ours, theirs = M.build("resnet50"), torchvision.models.resnet50()
    assert net.params() == sum(p.numel() for p in theirs.parameters()) - 2 * sum(
        m.num_features for m in theirs.modules() if isinstance(m, nn.BatchNorm2d)) + sum(
        m.out_channels for m in theirs.modules() if isinstance(m, nn.Conv2d))  # BN folded: conv biases
    assert list(ours.state_dict()) == list(theirs.state_dict())  # torchvision's key names, same order
    # one gate after the stem, two per bottleneck, one per stage trunk: 1 + 16 * 2 + 4
    assert len(net.searched) == 37
    trunks = [g for g in net.groups() if len(g.producers) > 1]
    assert [(g.size, len(g.producers)) for g in trunks] == [(256, 4), (512, 5), (1024, 7), (2048, 4)]
    assert trunks[0].producers == ["layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"]
    assert trunks[0].sites == ["layer1.0.bn3", "layer1.0.downsample.1", "layer1.1.bn3", "layer1.2.bn3"]


def test_torchvision_resnet_weights_load_by_their_own_names(tmp_path):
    import torchvision

    from pas.checkpoints import load_checkpoint
    theirs = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=3).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "r18.pth")
    ours = M.build("resnet18", num_classes=10)
    assert load_checkpoint(tmp_path / "r18.pth", ours) == "pas"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))


def _tp_groups(model, example, ignored):
    import torch_pruning as tp
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    out = set()
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        out.add(frozenset(names[dep.target.module] for dep, _ in group
                          if dep.handler.__name__ == "prune_out_channels"
                          and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))))
    return out


def _our_groups(net):
    g = net.graph
    return {frozenset(layer.module for layer in g.layers if layer.kind in ("conv", "depthwise", "grouped", "linear")
                      and any(g.space_group[s] == group.index for s in layer.out_layout))
            for group in g.prunable()}


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v2", "torchvision:efficientnet_b0",
                                  "torchvision:mobilenet_v3_small", "resnet50"])
def test_groups_equal_torch_pruning_dependency_graph(name):
    model = M.build(name, **RGB64).eval()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    ours = _our_groups(model.arch)
    assert ours == _tp_groups(model, torch.randn(1, 3, 64, 64), [classifier])
    assert len(ours) == {"torchvision:mobilenet_v2": 25, "torchvision:efficientnet_b0": 40,
                         "torchvision:mobilenet_v3_small": 27, "resnet50": 37}[name]


def test_fusable_branches_do_not_couple_repvgg_layers():
    """Torch-Pruning ties each identity branch of the training form like a residual (4 groups for 10
    layers); read in fused form, every RepVGG layer is its own group."""
    model = M.build("repvgg_b0_mini", **SMALL).eval()
    assert len(_tp_groups(model, torch.randn(1, 1, 28, 28), [model.fc])) == 4
    assert [g.producers for g in model.arch.groups()] == [[f"blocks.{i}"] for i in range(10)]


def test_regnet_grouped_convs_are_pruned_by_whole_groups_as_torch_pruning_does():
    """A grouped conv's input and output channels are searched in equal blocks (one per conv group):
    the same 53 groups as Torch-Pruning's dependency graph, and every block of a group keeps the same
    count (`blocks` = the convs' groups, e.g. 48 channels in 6 groups of 8)."""
    model = M.build("torchvision:regnet_y_400mf", **RGB64).eval()
    net = model.arch
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert _our_groups(net) == _tp_groups(model, torch.randn(1, 3, 64, 64), [classifier])
    assert len(net.searched) == 53 and [g.reason for g in net.graph.groups if not g.prunable] == \
        ["the network input", "the network output"]
    grouped = {n: m.groups for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}
    assert len(grouped) == 16  # one per block; each reads one group (written by its 1x1 conv a) and writes one
    assert [g.blocks for g in net.groups() if g.producers[0] in grouped] == list(grouped.values())
    assert sum(g.blocks > 1 for g in net.groups()) == 2 * len(grouped)


def test_same_masks_give_the_per_family_results():
    """repvgg_b0_mini: the MACs, params and outputs of the per-family code, exactly. MobileNetV2: the
    same MACs and params; a masked hidden channel is now zero after the depth-wise conv too, where the
    per-family code let the constant ReLU6(bias) through and folded it into the projection bias."""
    ref = json.load(open(f"{DATA}.json"))
    tensors = load_file(f"{DATA}.safetensors")
    for name, r in ref.items():
        model = M.build(name, **SMALL).eval()
        model.load_state_dict({k.split("/", 1)[1]: v for k, v in tensors.items()
                               if k.startswith(f"{name}/") and k != f"{name}/input"})
        x = tensors[f"{name}/input"]
        assert model.arch.macs() == r["full_macs"] and model.arch.full_widths() == r["full_widths"]
        for case in r["cases"]:
            masks = [torch.tensor(m, dtype=torch.bool) for m in case["masks"]]
            set_masks(model, masks)
            small = compact(model).eval()
            assert small.arch.macs() == case["macs"]
            assert small.arch.params() == case["params"] == sum(p.numel() for p in small.parameters())
            with torch.no_grad():
                masked, out = model(x), small(x)
            assert rel_err(masked, out) <= 1e-5
            if name.startswith("repvgg"):
                # the recorded logits of the per-family code; within float rounding, as another CPU's
                # kernels sum in another order (bit-equal on the machine that recorded them)
                assert rel_err(torch.tensor(case["masked_logits"]), masked) <= 1e-6
                assert rel_err(torch.tensor(case["compact_logits"]), out) <= 1e-6


def test_hand_computed_macs_of_a_tiny_residual_net():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, 2, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.a = nn.Conv2d(4, 6, 1, bias=False)
            self.b = nn.Conv2d(6, 4, 3, 1, 1, bias=False)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            x = x + self.b(torch.relu(self.a(x)))
            return self.fc(x.mean((2, 3)))

    net = describe(Tiny(), torch.randn(1, 3, 8, 8))
    assert net.full_widths() == [4, 6] and net.num_classes == 5  # stem + residual: one group
    # stem 3*4*9*16, a 4*6*16, b 6*4*9*16, fc 4*5 at full width; kept (2, 3) below
    assert net.macs() == 1728 + 384 + 3456 + 20
    assert net.macs([2, 3]) == 3 * 2 * 9 * 16 + 2 * 3 * 16 + 3 * 2 * 9 * 16 + 2 * 5


class _Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w).mean((2, 3))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = -y
        return y


class _Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.norm = nn.LayerNorm([8, 4, 4])

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("module,needles", [
    (_Shuffle, ["method .view()", "<root> (_Shuffle)", "moves channels"]),
    (_Branchy, ["cannot trace _Branchy", "control flow"]),
    (_Norm, ["module norm (LayerNorm)", "no known channel semantics"]),
])
def test_untraceable_networks_fail_in_one_line(module, needles):
    with pytest.raises(PasError) as e:
        describe(module(), (3, 4, 4))
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_pas_info_on_a_user_model_by_import_path(tmp_path):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def build_net(num_classes, in_channels):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),\n"
        "                         nn.Conv2d(6, 10, 3, stride=2, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, num_classes))\n")
    cmd = [sys.executable, "-m", "pas.cli", "info", "mynets:build_net", "--resolution", "8", "--in-channels", "1",
           "--num-classes", "3"]
    info = json.loads(subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True).stdout)
    assert info["widths"] == [6, 10] and info["layer_sizes"] == [8, 4]
    assert info["macs"] == 1 * 6 * 9 * 64 + 6 * 10 * 9 * 16 + 10 * 3 and info["family"] == "custom"
    bad = subprocess.run(cmd[:4] + ["mynets:nope"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert "backbone 'mynets:nope' cannot be imported" in bad.stderr
    shuffled = subprocess.run(cmd[:4] + ["torchvision:shufflenet_v2_x0_5"], cwd=tmp_path, capture_output=True,
                              text=True)
    assert shuffled.returncode == 2 and shuffled.stderr.count("\n") == 1
    assert "in module stage2.0 (InvertedResidual)" in shuffled.stderr, shuffled.stderr


def test_gates_are_shared_by_a_residual_trunk():
    model = M.build("resnet10_mini", **SMALL)
    gates = attach_gates(model)
    trunk = model.arch.groups()[0]  # stem and layer1 (8 -> 8, no downsample): one group
    assert trunk.producers == ["conv1", "layer1.0.conv2"]
    # the stem's gate after its ReLU (and the identity max-pool of the small stem), the block's after
    # the post-add call of the block's ReLU
    assert model.maxpool._pas_mask[0].parts[0][0] is gates[0] is model.layer1[0].relu._pas_mask[1].parts[0][0]


def test_torchvision_mobilenetv2_weights_load_into_ours(tmp_path):
    import torchvision

    from pas.checkpoints import load_checkpoint
    theirs = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10), seed=5).eval()
    torch.save(theirs.state_dict(), tmp_path / "mbv2.pth")
    ours = M.build("mobilenetv2_100", num_classes=10)
    assert load_checkpoint(tmp_path / "mbv2.pth", ours) == "torchvision"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(theirs(x), ours.eval()(x)) <= 1e-6
    with pytest.raises(PasError, match="holds torchvision MobileNetV2 weights but the model is a RepVGG"):
        load_checkpoint(tmp_path / "mbv2.pth", M.build("repvgg_a0", num_classes=10))


@pytest.mark.parametrize("method", ["uniform", "bn_gamma", "l1"])
@pytest.mark.parametrize("name,kw", [("resnet26_mini", SMALL), ("torchvision:mobilenet_v3_small",
                                                                {"in_channels": 3, "resolution": 32, "num_classes": 10})])
def test_baselines_work_per_group_on_any_network(method, name, kw):
    from pas.pruners import prune
    from pas.search import resolve_target
    model = randomize_bn(M.build(name, **kw)).eval()
    target = resolve_target("45%", model.arch)
    masks = prune(method, model, target)
    assert [m.numel() for m in masks] == model.arch.full_widths()
    set_masks(model, masks)
    small = compact(model).eval()
    assert target * 0.99 <= ptflops_macs(small, kw["in_channels"], kw["resolution"]) <= target
    x = torch.randn(2, kw["in_channels"], kw["resolution"], kw["resolution"])
    with torch.no_grad():
        assert rel_err(model(x), small(x)) <= 1e-5


def test_l1_score_of_a_trunk_sums_its_producers_with_bn_folded():
    from pas.pruners import bn_gamma_scores, filter_l1
    model = randomize_bn(M.build("resnet10_mini", **SMALL)).eval()
    trunk = 0  # conv1 (stem) and layer1.0.conv2 share the trunk of stage 1
    scale = lambda bn: bn.weight / torch.sqrt(bn.running_var + bn.eps)  # noqa: E731
    expected = sum((conv.weight.abs().flatten(1).sum(1) * scale(bn).abs())
                   for conv, bn in ((model.conv1, model.bn1), (model.layer1[0].conv2, model.layer1[0].bn2)))
    torch.testing.assert_close(filter_l1(model)[trunk], expected.detach())
    torch.testing.assert_close(bn_gamma_scores(model)[trunk],
                               (model.bn1.weight.abs() + model.layer1[0].bn2.weight.abs()).detach())


class _LinearBottleneck(nn.Module):
    """conv -> BN -> conv with no activation between: the gate stays on the BN's output."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_gated_bn_equals_bn_times_mask_in_values_gradients_and_statistics():
    """A gate on a BN output (no activation after it) is applied as gamma*b, beta*b (no extra pass
    over the activations): compared with the plain product BN(x) * b, in training mode."""
    import copy

    from pas.graph.network import describe
    model = _LinearBottleneck()
    describe(model, (1, 6, 6))
    model.train()
    gates = attach_gates(model)
    assert [g.size for g in model.arch.groups()] == [4, 8]
    with torch.no_grad():
        gates[1].weight.copy_(torch.tensor([1.0, 0.2, 0.9, 0.1, 0.7, 0.3, 0.8, 0.6]))
    bn = model.bn2
    assert type(bn).__name__ == "GatedBatchNorm2d" and isinstance(bn, nn.BatchNorm2d)
    plain = copy.deepcopy(bn)
    plain.__class__ = nn.BatchNorm2d
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(4, 8, 6, 6)
    (bn(x) * g).sum().backward()
    mask = gates[1].mask().detach()
    (plain(x2) * mask.view(1, -1, 1, 1) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bn.weight.grad, plain.weight.grad)
    torch.testing.assert_close(bn.running_mean, plain.running_mean)
    grad_gate = gates[1].weight.grad.clone()
    gates[1].weight.grad = None
    (plain(x2) * gates[1].mask().view(1, -1, 1, 1) * g).sum().backward()
    torch.testing.assert_close(grad_gate, gates[1].weight.grad)
    from pas.gates import detach_gates
    detach_gates(model)
    assert type(bn) is nn.BatchNorm2d and "_pas_mask" not in bn.__dict__


def test_a_seeded_build_does_not_depend_on_the_graph_cache():
    """Tracing (reading a fused block builds a conv, whose init draws random numbers) must not move
    the seeded stream: the weights drawn after a build are the same whether its graph was cached."""
    M._graph.cache_clear()  # noqa: SLF001
    runs = []
    for _ in range(2):  # first: traces the graph; second: cached
        torch.manual_seed(0)
        model = M.build("repvgg_a0_mini", **SMALL)
        runs.append((model.state_dict(), torch.rand(4)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0].values(), runs[1][0].values()))
    assert torch.equal(runs[0][1], runs[1][1])
