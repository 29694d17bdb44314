"""Checkpoint loading under three naming schemes, and timm as an independent oracle for our fusion.

timm (1.0, byobnet RepVggBlock) model names that map onto the registry name of the same spelling:
repvgg_a0, repvgg_a1, repvgg_a2, repvgg_b0, repvgg_b1, repvgg_b1g4, repvgg_b2, repvgg_b2g4,
repvgg_b3. Same stage depths, widths (stem min(64, 64a), final 512b), strides, BN eps (1e-5), and
groups: timm groups every second block counting the stem as block 0 (blocks 2, 4, ..., 26), exactly
the official g2/g4 map and our GROUPED_LAYERS. timm's head is global average pool + `head.fc`
(its `final_conv` is an Identity for these configs), as ours is pool + `fc`.
- timm has no repvgg_b1g2 (ours and the official repository do): grouping is exercised with b1g4.
- timm's repvgg_b3g4 would map, but has no entry in our registry.
- timm's repvgg_d2se cannot map: every block has squeeze-excitation (`attn.fc1/fc2`) between the
  branch sum and the ReLU, which our RepVGGBlock does not have (nor do its (8, 14, 24, 1) depths
  match a registry entry); load_checkpoint refuses it by name.
"""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.utils.model import reparameterize_model
from torch import nn

from pas.checkpoints import detect_format, load_checkpoint, to_pas_state_dict
from pas.errors import PasError
from pas.models import build
from pas.reparam import reparameterize

torch.set_num_threads(1)

RES = 64
REL_TOL = 1e-4


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random conv/linear weights and random BN affine parameters *and* running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * fan_in ** -0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):       # timm's BatchNormAct2d is one too
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.abs().max()
    assert scale > 0, f"{what}: degenerate reference output"
    err = float((got - ref).abs().max() / scale)
    assert err <= REL_TOL, f"{what}: max-abs error {err:.2e} of the output scale (tolerance {REL_TOL:.0e})"


# ------------------------------------------------------------------------------------------------
# A minimal stand-in for the official DingXiaoH/RepVGG repvgg.py, reproducing its module names and
# arithmetic (conv_bn Sequential with 'conv'/'bn', rbr_dense/rbr_1x1/rbr_identity, rbr_reparam in
# deploy form, stage0 single block, stage1..4 block lists, gap + 'linear').

def _official_conv_bn(c_in, c_out, k, stride, groups):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(c_out))
    return seq


class OfficialBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, groups=1, deploy=False):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
            self.rbr_dense = _official_conv_bn(c_in, c_out, 3, stride, groups)
            self.rbr_1x1 = _official_conv_bn(c_in, c_out, 1, stride, groups)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        return self.nonlinearity(y if self.rbr_identity is None else y + self.rbr_identity(x))


class OfficialRepVGG(nn.Module):
    def __init__(self, num_blocks, width_multiplier, groups_map=None, num_classes=10, deploy=False):
        super().__init__()
        groups_map = groups_map or {}
        planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = OfficialBlock(3, planes, 2, deploy=deploy)
        layer = 1
        for s, (n, base, w) in enumerate(zip(num_blocks, (64, 128, 256, 512), width_multiplier), start=1):
            blocks = []
            for j in range(n):
                blocks.append(OfficialBlock(planes, int(base * w), 2 if j == 0 else 1,
                                            groups_map.get(layer, 1), deploy))
                planes, layer = int(base * w), layer + 1
            setattr(self, f"stage{s}", nn.ModuleList(blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.stage0(x)
        for s in range(1, 5):
            for block in getattr(self, f"stage{s}"):
                x = block(x)
        return self.linear(torch.flatten(self.gap(x), 1))


def official_a0(deploy=False):
    return OfficialRepVGG((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), deploy=deploy)


# ------------------------------------------------------------------------------------------------
# timm as the oracle: its training-form forward and its own fusion against ours.

@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def timm_a0():
    return randomize_(timm.create_model("repvgg_a0", pretrained=False, num_classes=10), seed=1)


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b0", "repvgg_b1g4"])
def test_timm_weights_give_timm_outputs_before_and_after_fusion(name, x, timm_a0):
    theirs = timm_a0 if name == "repvgg_a0" else randomize_(
        timm.create_model(name, pretrained=False, num_classes=10), seed=2)
    ours = build(name, num_classes=10, resolution=RES)
    sd = theirs.state_dict()
    assert detect_format(sd) == "timm"
    ours.load_state_dict(to_pas_state_dict(sd, ours))     # strict: every key mapped, nothing left over
    ours.eval()
    if name == "repvgg_b1g4":
        assert {b.rbr_dense[0].groups for b in ours.blocks} == {1, 4}
    with torch.no_grad():
        ref = theirs(x)
        assert ref.std(0).max() > 1e-3 * ref.abs().max(), "outputs do not depend on the input"
        assert_close(ours(x), ref, f"{name} training form, ours vs timm")
        theirs_fused = reparameterize_model(theirs)          # timm's own fusion, on a copy
        ours_fused = reparameterize(ours)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in ours_fused.modules())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in theirs_fused.modules())
        out_theirs_fused, out_ours_fused = theirs_fused(x), ours_fused(x)
        assert_close(out_ours_fused, out_theirs_fused, f"{name} fused, ours vs timm")
        assert_close(out_ours_fused, ref, f"{name} fused ours vs unfused timm")
        assert_close(out_theirs_fused, ref, f"{name} fused timm vs unfused timm")


def test_timm_deploy_checkpoint_loads_into_our_deploy_model(x, timm_a0, tmp_path):
    fused = reparameterize_model(timm_a0)
    path = tmp_path / "timm_deploy.pt"
    torch.save(fused.state_dict(), path)
    ours = build("repvgg_a0", num_classes=10, resolution=RES, deploy=True)
    assert load_checkpoint(path, ours) == "timm"
    with torch.no_grad():
        assert_close(ours.eval()(x), timm_a0(x), "timm deploy checkpoint in our deploy model")
    with pytest.raises(PasError, match=r"deploy-form RepVGG weights but the model is in training form; "
                                       r"build it with deploy=True"):
        load_checkpoint(path, build("repvgg_a0", num_classes=10, resolution=RES))


# ------------------------------------------------------------------------------------------------
# The official repository's names, training and deploy form.

@pytest.fixture(scope="module")
def official():
    return randomize_(official_a0(), seed=3)


def test_official_training_checkpoint(official, x):
    sd = official.state_dict()
    assert detect_format(sd) == "official"
    ours = build("repvgg_a0", num_classes=10, resolution=RES)
    ours.load_state_dict(to_pas_state_dict(sd, ours))
    with torch.no_grad():
        ref = official(x)
        assert_close(ours.eval()(x), ref, "official names, training form")
        assert_close(reparameterize(ours)(x), ref, "official names, fused")


def test_official_deploy_checkpoint(x, tmp_path):
    theirs = randomize_(official_a0(deploy=True), seed=4)
    path = tmp_path / "official_deploy.pth"
    torch.save(theirs.state_dict(), path)
    ours = build("repvgg_a0", num_classes=10, resolution=RES, deploy=True)
    assert load_checkpoint(path, ours) == "official"
    with torch.no_grad():
        assert_close(ours.eval()(x), theirs(x), "official deploy form")


def test_squeeze_excitation_and_repvggplus_are_refused(official, timm_a0):
    ours = build("repvgg_a0", num_classes=10, resolution=RES)
    sd = dict(official.state_dict(), **{"stage1.0.se.down.weight": torch.zeros(3, 48, 1, 1)})
    with pytest.raises(PasError, match=r"'stage1\.0\.se\.down\.weight' belongs to a squeeze-excitation layer"):
        to_pas_state_dict(sd, ours)
    sd = dict(timm_a0.state_dict(), **{"stages.0.0.attn.fc1.weight": torch.zeros(3, 48, 1, 1)})
    with pytest.raises(PasError, match=r"'stages\.0\.0\.attn\.fc1\.weight' .*repvgg_d2se"):
        to_pas_state_dict(sd, ours)
    sd = dict(official.state_dict(), **{"stage3_first.0.rbr_dense.conv.weight": torch.zeros(1)})
    with pytest.raises(PasError, match="RepVGGplus"):
        to_pas_state_dict(sd, ours)


# ------------------------------------------------------------------------------------------------
# Round trips through files.

def test_round_trip_each_format_through_a_file(official, timm_a0, x, tmp_path):
    ours_src = randomize_(build("repvgg_a0", num_classes=10, resolution=RES), seed=5)
    for fmt, src in (("pas", ours_src), ("official", official), ("timm", timm_a0)):
        path = tmp_path / f"{fmt}.pt"
        torch.save(src.state_dict(), path)
        dst = build("repvgg_a0", num_classes=10, resolution=RES)
        assert load_checkpoint(path, dst) == fmt
        with torch.no_grad():
            assert_close(dst.eval()(x), src(x), f"{fmt} file round trip")
        path.unlink()
    # safetensors, with a DistributedDataParallel prefix on every key
    path = tmp_path / "timm.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in timm_a0.state_dict().items()}, str(path))
    dst = build("repvgg_a0", num_classes=10, resolution=RES)
    assert load_checkpoint(path, dst) == "timm"
    with torch.no_grad():
        assert_close(dst.eval()(x), timm_a0(x), "safetensors round trip")


@pytest.fixture
def mini():
    return randomize_(build("repvgg_a0_mini", num_classes=10, resolution=32), seed=6)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_containers(mini, wrap, tmp_path):
    sd = mini.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3, "best_acc1": 0.5},
           "model": {"model": sd, "optimizer": {"lr": 0.1}},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pt")
    dst = build("repvgg_a0_mini", num_classes=10, resolution=32)
    assert load_checkpoint(tmp_path / "w.pt", dst) == "pas"
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_mobilenetv2_in_our_names(tmp_path):
    src = randomize_(build("mobilenetv2_mini", num_classes=10, resolution=32), seed=7)
    torch.save(src.state_dict(), tmp_path / "m.pt")
    dst = build("mobilenetv2_mini", num_classes=10, resolution=32)
    assert load_checkpoint(tmp_path / "m.pt", dst) == "pas"
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


# ------------------------------------------------------------------------------------------------
# Errors: each a one-line PasError naming the file or key and what was expected.

class Payload:
    """An arbitrary object: a weights-only load must refuse it without running its __reduce__."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_file(mini, tmp_path):
    with pytest.raises(PasError, match=r"checkpoint .*nope\.pt not found") as e:
        load_checkpoint(tmp_path / "nope.pt", mini)
    _one_line(e)


def test_truncated_files(mini, tmp_path):
    torch.save(mini.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PasError, match=r"half\.pt is truncated or corrupt") as e:
        load_checkpoint(tmp_path / "half.pt", mini)
    _one_line(e)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(PasError, match=r"empty\.pt is truncated or corrupt"):
        load_checkpoint(tmp_path / "empty.pt", mini)
    save_file({k: v.contiguous() for k, v in mini.state_dict().items()}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PasError, match=r"half\.safetensors is truncated or corrupt"):
        load_checkpoint(tmp_path / "half.safetensors", mini)


def test_pickled_object_is_not_a_weights_file(mini, tmp_path):
    marker = tmp_path / "unpickling-ran"
    path = tmp_path / "object.pt"
    torch.save({"x": Payload(marker), **mini.state_dict()}, path)
    with pytest.raises(PasError, match=r"object\.pt is not a weights file: .*GLOBAL io\.open") as e:
        load_checkpoint(path, mini)
    _one_line(e)
    assert not marker.exists(), "the pickled object's code ran"


def test_other_non_weights_files(mini, tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(PasError, match=r"tensor\.pt is not a weights file: it holds a Tensor"):
        load_checkpoint(tmp_path / "tensor.pt", mini)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pt")
    with pytest.raises(PasError, match=r"meta\.pt is not a weights file: .*'state_dict' or 'model'.*'epoch'"):
        load_checkpoint(tmp_path / "meta.pt", mini)


def test_unknown_naming_scheme(mini, tmp_path):
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.weight": torch.zeros(10, 8)},
               tmp_path / "vgg.pt")
    with pytest.raises(PasError, match=r"unknown naming scheme: the keys \('features\.0\.weight'"):
        load_checkpoint(tmp_path / "vgg.pt", mini)


def test_another_architectures_weights_name_key_and_shapes(tmp_path):
    a0 = build("repvgg_a0", num_classes=10, resolution=RES)
    torch.save(build("repvgg_a1", num_classes=10, resolution=RES).state_dict(), tmp_path / "a1.pt")
    with pytest.raises(PasError, match=r"a1\.pt: key 'blocks\.0\.rbr_dense\.0\.weight' has shape \(64, 3, 3, 3\), "
                                       r"expected \(48, 3, 3, 3\)") as e:
        load_checkpoint(tmp_path / "a1.pt", a0)
    _one_line(e)
    # In another scheme the message names the checkpoint's own key and ours.
    with torch.device("meta"):
        timm_a1 = timm.create_model("repvgg_a1", pretrained=False, num_classes=10)
    with pytest.raises(PasError, match=r"key 'stem\.conv_kxk\.conv\.weight' \(our 'blocks\.0\.rbr_dense\.0\.weight'\) "
                                       r"has shape \(64, 3, 3, 3\), expected \(48, 3, 3, 3\)"):
        to_pas_state_dict(timm_a1.state_dict(), a0)


def test_class_count_mismatch_names_the_head(timm_a0):
    ours = build("repvgg_a0", num_classes=1000, resolution=RES)
    with pytest.raises(PasError, match=r"'head\.fc\.weight' \(our 'fc\.weight'\) has shape \(10, 1280\), "
                                       r"expected \(1000, 1280\)"):
        to_pas_state_dict(timm_a0.state_dict(), ours)


def test_missing_and_unexpected_keys(mini, tmp_path):
    sd = mini.state_dict()
    dropped = {k: v for k, v in sd.items() if k not in ("fc.weight", "fc.bias")}
    torch.save(dropped, tmp_path / "dropped.pt")
    dst = build("repvgg_a0_mini", num_classes=10, resolution=32)
    with pytest.raises(PasError, match=r"dropped\.pt \(pas names\) does not fit the model: 2 missing keys "
                                       r"\('fc\.weight', 'fc\.bias'\)") as e:
        load_checkpoint(tmp_path / "dropped.pt", dst)
    _one_line(e)
    assert load_checkpoint(tmp_path / "dropped.pt", dst, strict=False) == "pas"
    assert torch.equal(dst.blocks[0].rbr_dense[0].weight, mini.blocks[0].rbr_dense[0].weight)

    torch.save(dict(sd, **{"blocks.0.extra.weight": torch.zeros(1)}), tmp_path / "extra.pt")
    with pytest.raises(PasError, match=r"1 unexpected keys \('blocks\.0\.extra\.weight'\)"):
        load_checkpoint(tmp_path / "extra.pt", dst)
    assert load_checkpoint(tmp_path / "extra.pt", dst, strict=False) == "pas"

    # Old checkpoints without num_batches_tracked load strictly.
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt", dst) == "pas"


def test_timm_unrecognised_keys_are_unexpected_under_their_own_names(timm_a0, tmp_path):
    sd = dict(timm_a0.state_dict(), **{"stages.0.0.conv_kxk.conv.bias": torch.zeros(48)})
    torch.save(sd, tmp_path / "t.pt")
    with pytest.raises(PasError, match=r"\(timm names\) does not fit the model: 1 unexpected keys "
                                       r"\('stages\.0\.0\.conv_kxk\.conv\.bias'\)"):
        load_checkpoint(tmp_path / "t.pt", build("repvgg_a0", num_classes=10, resolution=RES))


def test_foreign_scheme_into_a_non_repvgg_model(timm_a0):
    with pytest.raises(PasError, match=r"holds timm RepVGG weights but the model is a MobileNetV2"):
        to_pas_state_dict(timm_a0.state_dict(), build("mobilenetv2_mini", num_classes=10, resolution=32))
