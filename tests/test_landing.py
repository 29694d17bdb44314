"""The landing: allowed widths (search.channel_multiple, grouped convs), the fewest moves to the
target, and the record of what it moved. Oracles: toy networks whose MACs and landed masks are
computed by hand below, ptflops, and the widths' divisibility for PaS and every baseline."""
import pytest
import torch
from torch import nn

import pas.models as M
from pas.compact import compact
from pas.errors import PasError
from pas.flops import ptflops_macs
from pas.gates import attach_gates, set_masks
from pas.graph.network import describe
from pas.landing import WidthRule, land
from pas.pruners import run_pruner
from pas.search import MacsPenalty, resolve_target, search
from tests.helpers import randomize_bn, rel_err

SMALL = {"in_channels": 1, "resolution": 28, "num_classes": 10}


class TwoConvs(nn.Module):
    """conv1 (1 -> 8, 3x3) and conv2 (8 -> 16, 3x3, `groups`) on a 4x4 map, pool, fc (16 -> 2).

    MACs(n1, n2) = 1*n1*9*16 + n1*n2*9*16/groups + n2*2 = 144 n1 + 144 n1 n2 / groups + 2 n2.
    """

    def __init__(self, *, groups: int = 1, width2: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, width2, 3, padding=1, groups=groups, bias=False)
        self.fc = nn.Linear(width2, 2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def two_convs(**kw) -> nn.Module:
    model = TwoConvs(**kw)
    describe(model, (1, 4, 4))
    return model


def widths(masks):
    return [int(m.sum()) for m in masks]


def kept(mask):
    return torch.nonzero(mask).flatten().tolist()


def test_allowed_widths_are_multiples_and_a_narrow_layer_keeps_its_width():
    arch = two_convs().arch
    assert arch.macs([8, 16]) == 144 * 8 + 144 * 8 * 16 + 2 * 16 == 19616
    rule = WidthRule(arch, channel_multiple=4)
    assert rule.allowed == [[4, 8], [4, 8, 12, 16]]
    assert WidthRule(arch, channel_multiple=16).allowed == [[8], [16]]  # 8 < 16: its full width only
    assert WidthRule(arch, channel_multiple=6, min_channels=7).allowed == [[8], [12, 16]]
    assert rule.nearest([7, 10]) == [8, 12]  # 10 is halfway between 8 and 12: the wider


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True])
def test_channel_multiple_must_be_a_positive_integer(bad):
    with pytest.raises(PasError, match=rf"channel_multiple {bad!r} is not a positive integer; expected 1"):
        WidthRule(two_convs().arch, channel_multiple=bad)


def test_a_target_below_the_narrowest_aligned_widths_is_refused():
    """With channel_multiple 8 the narrowest widths are (8, 8): 144*8 + 144*64 + 16 = 10384 MACs."""
    arch = two_convs().arch
    assert resolve_target(10000, arch) == 10000
    with pytest.raises(PasError, match=r"target 10000 = 10000 MACs is below 10384, the MACs with 1 channel\(s\) "
                                       r"per layer, widths multiples of 8; allowed range is \(10384, 19616\)"):
        resolve_target(10000, arch, channel_multiple=8)


def test_landing_by_hand_with_a_channel_multiple():
    """Gates of an unfinished search: conv1 keeps 7 of 8 (scores 0.9 ... 0.51 above 0.5, 0.3 below),
    conv2 13 of 16 (0.63 ... 0.75; 0.2, 0.3, 0.4 below). channel_multiple 4, target 10000 MACs:
    1. grid: n1 7 -> 8 (channel 7 comes in), n2 13 -> 12 (channel 3, its lowest kept, goes);
       MACs(8, 12) = 1152 + 13824 + 24 = 15000, the MACs the search's penalty counted;
    2. drop: conv1's step 8 -> 4 (channels 7, 6, 5, 4: mean 0.47) is below conv2's 12 -> 8 (0.655):
       MACs(4, 12) = 576 + 6912 + 24 = 7512 <= 10000;
    3. fill: conv1 4 -> 8 gives 15000, too much; conv2 12 -> 16 gives 576 + 9216 + 32 = 9824: taken.
    Moved: conv1 loses 4, 5, 6 and conv2 gains 0, 1, 2: 6 channels; |9824 - 15000| / 19616 of the MACs."""
    arch = two_convs().arch
    s1 = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.52, 0.51, 0.3])
    s2 = torch.tensor([0.2, 0.3, 0.4] + [0.6 + 0.01 * j for j in range(3, 16)])
    landing = land(arch, [s1 > 0.5, s2 > 0.5], [s1, s2], 10000, channel_multiple=4, tolerance=0.02)
    assert kept(landing.masks[0]) == [0, 1, 2, 3] and kept(landing.masks[1]) == list(range(16))
    assert landing.macs == arch.macs(widths(landing.masks)) == 9824
    assert landing.macs_before == 15000 and landing.moved_channels == 6
    assert landing.moved_macs_share == pytest.approx(5176 / 19616)
    assert landing.record() == {"search_macs_before_landing": 15000, "landing_moved_channels": 6,
                                "landing_moved_macs_share": pytest.approx(0.263866)}
    # without a multiple: MACs(7, 13) = 1008 + 13104 + 26 = 14138; conv1 drops 0.51, 0.52, 0.55 (its
    # lowest, below conv2's 0.63): MACs(4, 13) = 576 + 7488 + 26 = 8090; conv1's 0.55 back would give
    # 10106, conv2's 0.4, 0.3, 0.2 fit: (4, 14) 8668, (4, 15) 9246, (4, 16) 9824
    one = land(arch, [s1 > 0.5, s2 > 0.5], [s1, s2], 10000, tolerance=0.02)
    assert kept(one.masks[0]) == [0, 1, 2, 3] and kept(one.masks[1]) == list(range(16)) and one.macs == 9824
    assert one.macs_before == 14138 and one.moved_channels == 6


def test_landing_keeps_equal_counts_in_every_group_of_a_grouped_conv():
    """conv2 has 2 groups: conv1's 8 channels are 2 blocks (0-3, 4-7) that must keep equal counts.
    MACs(n1, n2) = 144 n1 + 72 n1 n2 + 2 n2 (n2 = 16 stays whole: its scores are 1). Target 6000:
    from (8, 16) = 10400 conv1 steps down by one channel per block, each block's lowest first:
    block 0 scores 0.9, 0.1, 0.2, 0.3 and block 1 0.8, 0.7, 0.6, 0.5, so (1, 7) go, then (2, 6):
    MACs(6, 16) = 864 + 6912 + 32 = 7808, MACs(4, 16) = 576 + 4608 + 32 = 5216 <= 6000. Kept: 0, 3
    and 4, 5, where the best four scores of the layer (0, 4, 5, 6) would leave the groups unequal."""
    model = two_convs(groups=2)
    arch = model.arch
    assert arch.blocks() == [2, 2]
    s1 = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.6, 0.5])
    everything = [torch.ones(8, dtype=torch.bool), torch.ones(16, dtype=torch.bool)]
    landing = land(arch, everything, [s1, torch.ones(16)], 6000, tolerance=0.15)
    assert kept(landing.masks[0]) == [0, 3, 4, 5] and landing.macs == 5216
    set_masks(model, landing.masks)
    small = compact(model).eval()
    assert small.conv2.groups == 2 and tuple(small.conv2.weight.shape) == (16, 2, 3, 3)
    assert ptflops_macs(small, 1, 4) == 5216
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        assert rel_err(model(x), small(x)) <= 1e-5


def test_compaction_refuses_unequal_groups():
    model = two_convs(groups=2)
    set_masks(model, [torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool), torch.ones(16, dtype=torch.bool)])
    with pytest.raises(PasError, match=r"grouped conv conv2 \(groups=2\) would keep \[3, 1\] input channels per "
                                       r"group; expected the same count in every group"):
        compact(model)


def test_penalty_counts_the_nearest_allowed_widths():
    """Kept 7 and 10 with channel_multiple 4 are counted as 8 and 12: MACs(8, 12) = 15000. The
    gradient passes straight through the rounding: d/dn1 at (8, 12) = 144 + 144 * 12 = 1872."""
    model = two_convs()
    gates = attach_gates(model)
    with torch.no_grad():
        gates[0].weight[7:] = 0.0
        gates[1].weight[10:] = 0.0
    penalty = MacsPenalty(model.arch, 9000, alpha=1.0, rule=WidthRule(model.arch, channel_multiple=4))
    value, macs = penalty(model)
    assert float(macs.detach()) == 15000
    macs.backward()
    assert gates[0].weight.grad.tolist() == [1872.0] * 8


@pytest.mark.parametrize("method", ["pas", "uniform", "bn_gamma", "l1"])
@pytest.mark.parametrize("name,multiple", [("repvgg_b1_mini", 8), ("mobilenetv2_mini", 8), ("mobilenetv2_mini", 16)])
def test_every_width_is_a_multiple_for_pas_and_every_baseline(name, multiple, method):
    torch.manual_seed(0)
    model = randomize_bn(M.build(name, **SMALL))
    full = model.arch.full_widths()
    target = resolve_target("40%", model.arch, channel_multiple=multiple)
    if method == "pas":  # a short real search: 6 steps on random images; it leaves the landed masks set
        batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(6)]
        masks = search(model, batches, target=target, epochs=1, channel_multiple=multiple).masks
    else:
        masks = run_pruner(method, model, target, channel_multiple=multiple).masks
        set_masks(model, masks)
    for w, f in zip(widths(masks), full):
        assert w % multiple == 0 or w == f < multiple, (widths(masks), full)
    # the compact network those masks give, counted by ptflops, is within 1% below the target
    small = compact(model.eval()).eval()
    assert small.arch.searchable_widths() == widths(masks)
    assert target * 0.99 <= ptflops_macs(small, 1, 28) <= target


def test_landing_errors_name_the_step_and_the_remedy():
    """repvgg_b0_mini at 850912 MACs with widths in steps of 16: the closest mask is 1.9% short."""
    model = M.build("repvgg_b0_mini", **SMALL)
    with pytest.raises(PasError, match=r"cannot reach target 850912 MACs within 1.0%: the closest mask gives "
                                       r"\d+ MACs; widths move in steps of \[16\] channels \(channel_multiple 16"):
        run_pruner("uniform", model, 850912, channel_multiple=16)


def test_a_landing_that_moved_more_than_5_percent_is_a_warning(capsys):
    from pas.landing import Landing
    from pas.stages import _warn_if_unconverged
    _warn_if_unconverged(Landing([], 9824, 15000, 6, 0.2639))
    assert capsys.readouterr().err == ("[search] warning: the landing moved 26.4% of the full network's MACs (15000 -> "
                                       "9824, 6 channels): the search did not converge: more steps, or a larger search.gain "
                                       "(objective constraint) or alpha (paper)\n")
    _warn_if_unconverged(Landing([], 9824, 10500, 2, 0.0345))
    assert capsys.readouterr().err == ""
