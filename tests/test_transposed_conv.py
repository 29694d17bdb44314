"""Transposed convs (a decoder's upsampling, as in CycleGAN's generator) in the generic mechanism: traced
and searched like convs, their MACs against ptflops and hand arithmetic, compaction against the masked
network, a short search on target, the l1 baseline's filters, the refusal of grouped ones, and the
layer the latency table rebuilds against the original module."""
import pytest
import torch
from torch import nn

from pas.compact import compact
from pas.errors import PasError
from pas.flops import ptflops_macs
from pas.gates import gated_macs, set_masks
from pas.graph.network import describe
from tests.helpers import random_masks, randomize_bn, rel_err


class EncoderDecoder(nn.Module):
    """Two stride-2 convs down, two stride-2 transposed convs up (k3, p1, output padding 1: the side
    doubles), a 7x7 conv to the output image, as in CycleGAN's ResNet generator without its blocks."""

    def __init__(self, widths=(8, 16, 8, 4), in_channels=3, out_channels=3):
        super().__init__()
        a, b, c, d = widths
        self.c1, self.b1 = nn.Conv2d(in_channels, a, 3, 2, 1, bias=False), nn.BatchNorm2d(a)
        self.c2, self.b2 = nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b)
        self.t1, self.b3 = nn.ConvTranspose2d(b, c, 3, 2, 1, output_padding=1, bias=True), nn.BatchNorm2d(c)
        self.t2 = nn.ConvTranspose2d(c, d, 3, 2, 1, output_padding=1, bias=True)
        self.n4 = nn.InstanceNorm2d(d, affine=True)
        self.pad = nn.ReflectionPad2d(3)
        self.out = nn.Conv2d(d, out_channels, 7)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.t1(x)))
        x = torch.relu(self.n4(self.t2(x)))
        return torch.tanh(self.out(self.pad(x)))


def _trained_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN running statistics from a few training-mode passes, random BN and instance-norm affine
    parameters: folding and masking are tested on real numbers. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    randomize_bn(model, seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32, generator=g) * 2 + 0.5)
        model.n4.weight.copy_(torch.rand(model.n4.num_features, generator=g) + 0.5)
        model.n4.bias.copy_(torch.randn(model.n4.num_features, generator=g) * 0.1)
    return model.eval()


def _all_kept(model):
    return compact(model, [torch.ones(w, dtype=torch.bool) for w in model.arch.full_widths()]).eval()


def test_transposed_convs_are_searched_and_their_macs_equal_ptflops_and_hand_arithmetic():
    model = _trained_stats(EncoderDecoder())
    net = describe(model, (3, 32, 32))
    assert net.group_names() == ["c1", "c2", "t1", "t2"] and net.full_widths() == [8, 16, 8, 4]
    t1, t2 = (layer for layer in net.graph.layers if layer.kind == "transposed")
    assert (t1.module, t1.in_hw, t1.out_hw, t1.output_padding, t1.bn) == ("t1", (8, 8), (16, 16), (1, 1), "b3")
    assert (t2.module, t2.in_hw, t2.out_hw, t2.bn) == ("t2", (16, 16), (32, 32), None)
    # C_in * C_out * k^2 * (conv: output pixels, transposed conv: input pixels)
    assert net.macs() == (3 * 8 * 9 * 16 * 16 + 8 * 16 * 9 * 8 * 8  # c1, c2
                          + 16 * 8 * 9 * 8 * 8 + 8 * 4 * 9 * 16 * 16  # t1, t2
                          + 4 * 3 * 49 * 32 * 32)  # out
    # weights and biases (b3 folded into t1, b1 and b2 into c1 and c2), the instance norm's affine
    assert net.params() == (3 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 8 * 9 + 8) + (8 * 4 * 9 + 4) + 2 * 4 \
        + (4 * 3 * 49 + 3)
    full = _all_kept(model)
    assert ptflops_macs(model, 3, 32) == ptflops_macs(full, 3, 32) == net.macs()
    assert sum(p.numel() for p in full.parameters()) == net.params()
    for seed in range(3):
        masks = random_masks(net.full_widths(), seed=seed, p=0.6)
        set_masks(model, masks)
        small = compact(model).eval()
        widths = [int(m.sum()) for m in masks]
        assert int(gated_macs(model)) == net.macs(widths) == ptflops_macs(small, 3, 32), seed
        assert sum(p.numel() for p in small.parameters()) == small.arch.params() == net.params(widths)


def test_the_compact_network_equals_the_masked_one():
    model = _trained_stats(EncoderDecoder())
    describe(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    full = _all_kept(model)
    assert isinstance(full.b3, nn.Identity) and isinstance(full.t1, nn.ConvTranspose2d)  # BN folded into t1
    with torch.no_grad():
        assert rel_err(model(x), full(x)) <= 1e-5
    for seed in range(3):
        masks = random_masks(model.arch.full_widths(), seed=seed, p=0.5)
        set_masks(model, masks)
        small = compact(model).eval()
        a, b, c, d = (int(m.sum()) for m in masks)
        assert (small.t1.in_channels, small.t1.out_channels, small.t2.in_channels, small.t2.out_channels) \
            == (b, c, c, d), seed
        assert (small.t1.stride, small.t1.padding, small.t1.output_padding) == ((2, 2), (1, 1), (1, 1))
        with torch.no_grad():
            masked, out = model(x), small(x)
            assert rel_err(masked, out) <= 1e-5, seed
            assert rel_err(masked, full(x)) > 1e-3, seed  # the masks do change the output


def test_a_short_search_lands_on_the_macs_target():
    """4 steps on random images, per-pixel classes as the labels (cross-entropy over the 3 output
    channels): on 50% of ptflops' count, within the 1% tolerance, and the compact network is the
    masked one. (At widths (16, 32, 16, 8) one channel of t2 costs 8.5% of the MACs, 3 * 49 * 32^2 of
    them in the 7x7 conv it feeds; the landing, one swap at a time, then stops 2.2% short.)"""
    from pas.search import search
    model = randomize_bn(EncoderDecoder(widths=(16, 32, 32, 32)))
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4, 32, 32))) for _ in range(4)]
    result = search(model, batches, target="50%", epochs=1, example_input=(3, 32, 32))
    assert model.arch.group_names() == ["c1", "c2", "t1", "t2"]
    full = ptflops_macs(model, 3, 32)
    small = compact(model.eval()).eval()
    macs = ptflops_macs(small, 3, 32)
    assert result.target_macs == round(0.5 * full)
    assert macs == result.macs and 0.99 * result.target_macs <= macs <= result.target_macs
    assert [small.t1.out_channels, small.t2.out_channels] == [int(m.sum()) for m in result.masks[2:]]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), small(x)) <= 1e-4


def test_the_l1_baseline_reads_a_transposed_convs_filters_by_output_column():
    """A transposed conv's weight is (C_in, C_out, k, k): output channel o's filter is weight[:, o],
    scaled by its BN's gamma / sigma."""
    from pas.pruners import filter_l1, prune
    from pas.search import resolve_target
    model = _trained_stats(EncoderDecoder())
    describe(model, (3, 32, 32))
    scale = (model.b3.weight / torch.sqrt(model.b3.running_var + model.b3.eps)).abs()
    scores = filter_l1(model)
    torch.testing.assert_close(scores[2], (model.t1.weight.abs().sum((0, 2, 3)) * scale).detach())
    torch.testing.assert_close(scores[3], model.t2.weight.abs().sum((0, 2, 3)).detach())
    target = resolve_target("60%", model.arch)
    set_masks(model, prune("l1", model, target))
    assert 0.99 * target <= ptflops_macs(compact(model).eval(), 3, 32) <= target


@pytest.mark.parametrize("groups", [2, 8])
def test_a_grouped_transposed_conv_is_refused_in_one_line(groups):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 8, 3, 2, 1, output_padding=1, groups=groups), nn.Conv2d(8, 3, 1))
    with pytest.raises(PasError) as e:
        describe(model, (3, 16, 16))
    message = str(e.value)
    assert "\n" not in message and f"module 2 (ConvTranspose2d with groups={groups})" in message, message
    assert "grouped transposed convs are not supported" in message


def test_the_latency_table_times_a_transposed_conv_of_the_traced_geometry():
    """The layer the table rebuilds for a transposed conv is a ConvTranspose2d of the module's geometry,
    with the module's output shape; a measured table (ONNX Runtime, 2 points per axis, the two-point
    calibration: exact on the full network) predicts this network."""
    from pas.latency_table import layer_module, measure_table, plan, timed_layers
    model = EncoderDecoder()
    net = describe(model, (3, 32, 32))
    entries, of_layer = plan(net, points=2)
    layers = timed_layers(net)
    assert [layer.kind for layer in layers] == ["conv", "conv", "transposed", "transposed", "conv"]
    for layer, e in zip(layers, of_layer):
        if layer.kind != "transposed":
            continue
        original = model.get_submodule(layer.module)
        entry = entries[e]
        for c_in in entry["in_widths"]:
            for c_out in entry["out_widths"]:
                built, shape = layer_module(entry, c_in, c_out)
                conv = built[0]
                assert isinstance(conv, nn.ConvTranspose2d) and isinstance(built[1], nn.ReLU)
                assert (conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation) == \
                    (original.kernel_size, original.stride, original.padding, original.output_padding,
                     original.dilation)
                assert (conv.in_channels, conv.out_channels, conv.bias is not None) == (c_in, c_out, True)
                with torch.no_grad():
                    got = conv(torch.zeros(1, *shape)).shape
                    want = original(torch.zeros(1, original.in_channels, *layer.in_hw)).shape
                assert got[2:] == want[2:] == torch.Size(layer.out_hw) and got[1] == c_out
    table = measure_table(model, runtime="onnxruntime", points=2, rounds=2, warmup=0, check=(0.5,), networks=0)
    table.check_network(net)
    assert [r["kind"] for r in table.data["layers"]] == [layer.kind for layer in layers]
    assert table.predict(net) == pytest.approx(table.data["full_ms"])
