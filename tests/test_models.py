"""Core: the registry, published MACs/params, ptflops cross-check, exact fusion, bad input."""
import json
import subprocess
import sys

import pytest
import torch

import pas.models as M
from pas.compact import compact
from pas.errors import PasError
from pas.flops import ptflops_macs
from pas.reparam import reparameterize
from tests.helpers import randomize_bn, rel_err

# RepVGG paper, Table 2/3: deploy MACs (G) and params (M) at 224x224, 1000 classes.
PUBLISHED = {"repvgg_a0": (1.36, 8.30), "repvgg_a1": (2.36, 12.78), "repvgg_a2": (5.12, 25.49),
             "repvgg_b0": (3.06, 14.33), "repvgg_b1": (11.81, 51.82), "repvgg_b1g2": (8.82, 41.36),
             "repvgg_b1g4": (7.31, 36.12), "repvgg_b2": (18.38, 80.31), "repvgg_b2g4": (11.34, 55.77),
             "repvgg_b3": (26.21, 110.96)}
SMALL = {"in_channels": 1, "resolution": 28, "num_classes": 10}


def small_kwargs(name):
    if name == "yolact_mini":  # its scenes: 64 px (a multiple of 32), 10 classes
        return {"in_channels": 1, "resolution": 64, "num_classes": 10}
    return SMALL if name.endswith(("_mini", "_mini_035")) else {"in_channels": 3, "resolution": 48, "num_classes": 10}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_macs_and_params(name):
    arch = M.arch_for(name)
    gmacs, mparams = PUBLISHED[name]
    assert arch.macs() / 1e9 == pytest.approx(gmacs, rel=0.005)
    assert arch.params() / 1e6 == pytest.approx(mparams, rel=0.005)


def test_b1_is_11_81_g_conv_macs_and_a0_layout():
    arch = M.arch_for("repvgg_b1")
    assert len(arch.widths) == 28  # one gate per block: 28 for B1, per the method doc
    assert (arch.macs() - 2048 * 1000) / 1e9 == pytest.approx(11.813, abs=0.0005)
    a0 = M.arch_for("repvgg_a0")
    assert a0.widths == (48,) + (48,) * 2 + (96,) * 4 + (192,) * 14 + (1280,)
    g4 = M.build("repvgg_b1g4")
    assert [i for i, b in enumerate(g4.blocks) if b.rbr_dense[0].groups == 4] == list(range(2, 27, 2))


def test_mobilenetv2_matches_torchvision_layout():
    import torchvision
    tv = torchvision.models.mobilenet_v2(width_mult=1.0)
    ours = M.build("mobilenetv2_100")
    tv_convs = [tuple(m.weight.shape) for m in tv.modules() if isinstance(m, torch.nn.Conv2d)]
    our_convs = [tuple(m.weight.shape) for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert our_convs == tv_convs  # 52 convs, same shapes and order
    assert len(our_convs) == 52
    assert M.arch_for("mobilenetv2_100").macs() / 1e9 == pytest.approx(0.30, abs=0.005)


def test_params_formula_equals_deploy_model():
    for name in M.names():
        model = M.build(name, **small_kwargs(name)).eval()
        deployed = compact(model, [torch.ones(w, dtype=torch.bool) for w in model.arch.full_widths()])
        assert sum(p.numel() for p in deployed.parameters()) == model.arch.params(), name


@pytest.mark.parametrize("name", M.names())
def test_fusion_is_exact_and_ptflops_agrees(name):
    kw = small_kwargs(name)
    model = randomize_bn(M.build(name, **kw)).eval()
    x = torch.randn(2, kw["in_channels"], kw["resolution"], kw["resolution"])
    fused = reparameterize(model).eval() if not name.startswith(("resnet", "yolact")) else \
        compact(model, [torch.ones(w, dtype=torch.bool) for w in model.arch.full_widths()])  # BN folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-4
    assert ptflops_macs(fused, kw["in_channels"], kw["resolution"]) == model.arch.macs()


def test_widths_builder_roundtrips_through_json():
    arch = M.arch_for("repvgg_a0_mini", **SMALL).with_widths([3, 4, 7, 5, 6, 9, 2, 5])
    back = M.network_from_dict(json.loads(json.dumps(arch.to_dict())))
    assert back.widths == arch.widths and back.macs() == arch.macs() and back.backbone == "repvgg_a0_mini"
    model = M.build_deployed(back)
    assert [b.conv.out_channels for b in model.blocks] == [3, 4, 7, 5, 6, 9, 2, 5]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    mb = M.arch_for("mobilenetv2_mini", **SMALL)
    assert M.network_from_dict(json.loads(json.dumps(mb.to_dict()))).widths == mb.widths
    with pytest.raises(PasError, match=r"widths \[3, 4\] do not fit repvgg_a0_mini: expected 8 widths"):
        arch.with_widths([3, 4])


def test_unknown_name_lists_known_models():
    with pytest.raises(PasError, match=r"unknown model 'repvgg_z9'; known models: .*repvgg_a0.*repvgg_b1"):
        M.build("repvgg_z9")


def test_too_small_resolution_names_the_minimum():
    with pytest.raises(PasError, match=r"resolution 16 is too small for repvgg_b1: its 5 stride-2 layers need at least 17"):
        M.arch_for("repvgg_b1", resolution=16)


def test_pas_info_cli_prints_stable_keys():
    out = subprocess.run([sys.executable, "-m", "pas.cli", "info", "repvgg_b1"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["macs"] == 11815485440 and round(info["conv_macs"] / 1e9, 2) == 11.81
    assert info["params"] == 51829480 and len(info["widths"]) == 28
    bad = subprocess.run([sys.executable, "-m", "pas.cli", "info", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("pas: error: unknown model 'nope'") and bad.stderr.count("\n") == 1
