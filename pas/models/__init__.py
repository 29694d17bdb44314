"""The model registry: every network by name, built with its channel graph attached as `.arch`.

    net = pas.models.build("repvgg_b1", num_classes=1000)            # training (multi-branch) form
    net.arch.macs(), net.arch.searchable_widths()                      # pas.graph.network.Network
    pas.models.build("torchvision:resnet50"), pas.models.build("mypkg.models:build_net")

Names: the registered members below; `torchvision:NAME` for any torchvision classification model;
`module.path:function` for a user's builder, called with num_classes and in_channels.
"""
from __future__ import annotations

import importlib
import re
from functools import lru_cache
from typing import Callable

import torch
from torch import nn

from pas.arch import minimum_resolution
from pas.errors import PasError
from pas.graph.channels import channel_graph
from pas.graph.network import Network, searched_groups
from pas.models.generator import ResnetGenerator
from pas.models.mobilenetv2 import MobileNetV2, mobilenetv2_arch
from pas.models.repvgg import RepVGG, repvgg_arch
from pas.models.resnet import ResNet

A_BLOCKS = (1, 2, 4, 14, 1)
B_BLOCKS = (1, 4, 6, 16, 1)
# Layers with groups in the g2/g4 variants, counting the stem as layer 0 (only those that exist).
GROUPED_LAYERS = tuple(range(2, 27, 2))
MULTIPLIERS = {"a0": (0.75, 2.5), "a1": (1, 2.5), "a2": (1.5, 2.75), "b0": (1, 2.5), "b1": (2, 4),
               "b2": (2.5, 5), "b3": (3, 5)}

# Small-input members (28x28 grayscale, 32x32 RGB): the same recipe with an eighth of the widths,
# fewer blocks per stage and a stride-1 first stage (28 -> 14 -> 14 -> 7 -> 4 -> 2), so they train at
# thousands of images per second on CPU.
MINI_BASE = (8, 8, 16, 32, 64)
MINI_A_BLOCKS = (1, 1, 2, 3, 1)
MINI_B_BLOCKS = (1, 2, 2, 4, 1)
MINI_STRIDES = (2, 1, 2, 2, 2)
# MobileNetV2 for small inputs: torchvision's recipe with the second stage at stride 1 (as in CIFAR
# variants), fewer repeats and a 256-wide last conv (28 -> 14 -> 7 -> 4 -> 2).
MINI_MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 1, 1), (6, 32, 2, 2), (6, 64, 2, 2),
                     (6, 96, 1, 1), (6, 160, 1, 2), (6, 320, 1, 1))

Builder = Callable[..., nn.Module]


def _repvgg(variant: str, groups: int = 1, mini: bool = False) -> Builder:
    a, b = MULTIPLIERS[variant]
    blocks = (MINI_B_BLOCKS if mini else B_BLOCKS) if variant[0] == "b" else (MINI_A_BLOCKS if mini else A_BLOCKS)
    extra = dict(base=MINI_BASE, strides=MINI_STRIDES) if mini else {}
    return lambda **kw: RepVGG(repvgg_arch(a=a, b=b, blocks=blocks, groups=groups,
                                           grouped_layers=GROUPED_LAYERS if groups > 1 else (), **extra, **kw))


def _mbv2(width_mult: float, mini: bool = False) -> Builder:
    extra = dict(setting=MINI_MBV2_SETTING, stem_stride=2, last_width=256) if mini else {}
    return lambda **kw: MobileNetV2(mobilenetv2_arch(width_mult=width_mult, **extra, **kw))


# ResNet: torchvision's ImageNet members, and small members for 28x28/32x32 inputs with a 3x3
# stride-2 stem (28 -> 14 -> 14 -> 7 -> 4 -> 2, as the other mini members) and an eighth of the widths.
RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}
MINI_RESNETS = {"resnet10_mini": ("basic", (1, 1, 1, 1)), "resnet18_mini": ("basic", (2, 2, 2, 2)),
                "resnet26_mini": ("bottleneck", (2, 2, 2, 2))}


def _resnet(block: str, blocks: tuple[int, ...], mini: bool = False) -> Builder:
    if mini:
        return lambda *, in_channels, num_classes, resolution: ResNet(
            block=block, blocks_per_stage=blocks, widths=(8, 16, 32, 64), stem_width=8, stem="small",
            stem_stride=2, in_channels=in_channels, num_classes=num_classes)
    return lambda *, in_channels, num_classes, resolution: ResNet(
        block=block, blocks_per_stage=blocks, widths=(64, 128, 256, 512), stem_width=64,
        in_channels=in_channels, num_classes=num_classes)


# Image-to-image generators (CycleGAN's layout; `num_classes` is the output image's channels): the
# 9-block members of CycleGAN (ResNet blocks) and GAN Compression (Mobile-ResNet: separable blocks)
# for 256x256 images, and small members for 28x28 images with a quarter of the filters and 3 blocks.
GENERATORS = {"resnet_generator": (64, 9, False), "mobile_resnet_generator": (64, 9, True),
              "resnet_generator_mini": (16, 3, False), "mobile_resnet_generator_mini": (16, 3, True)}


def _generator(filters: int, blocks: int, separable: bool) -> Builder:
    def build(*, in_channels, num_classes, resolution):
        if resolution % 4:
            raise PasError(f"resolution {resolution} does not suit a generator: its two stride-2 convs and two "
                           f"transposed convs give back the input size only for a multiple of 4")
        return ResnetGenerator(in_channels=in_channels, out_channels=num_classes, filters=filters, blocks=blocks,
                               separable=separable)
    return build


# Instance segmentation: a small YOLACT for the composed 64x64 scenes (pas.segmentation).
DETECTORS = ("yolact_mini",)


def _yolact(*, in_channels, num_classes, resolution):
    from pas.models.yolact import STRIDES, Yolact, YolactSpec
    if resolution % (2 * STRIDES[-1]):
        raise PasError(f"resolution {resolution} does not suit yolact_mini: its FPN up-samples stride "
                       f"{STRIDES[-1]} twice; expected a multiple of {2 * STRIDES[-1]}")
    return Yolact(YolactSpec(in_channels=in_channels, num_classes=num_classes, resolution=resolution))


REGISTRY: dict[str, Builder] = {
    **{name: _generator(*spec) for name, spec in GENERATORS.items()},
    "yolact_mini": _yolact,
    **{f"repvgg_{v}": _repvgg(v) for v in MULTIPLIERS},
    "repvgg_b1g2": _repvgg("b1", 2), "repvgg_b1g4": _repvgg("b1", 4), "repvgg_b2g4": _repvgg("b2", 4),
    **{f"repvgg_{v}_mini": _repvgg(v, mini=True) for v in ("a0", "a1", "b0", "b1")},
    "mobilenetv2_100": _mbv2(1.0), "mobilenetv2_075": _mbv2(0.75), "mobilenetv2_050": _mbv2(0.5),
    "mobilenetv2_mini": _mbv2(0.5, mini=True), "mobilenetv2_mini_035": _mbv2(0.35, mini=True),
    **{name: _resnet(*spec) for name, spec in RESNETS.items()},
    **{name: _resnet(*spec, mini=True) for name, spec in MINI_RESNETS.items()},
}
_USER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def names() -> list[str]:
    return sorted(REGISTRY)


def is_backbone(name: str) -> bool:
    """A registered name, `torchvision:NAME` or `module.path:function` (whether it builds is checked
    when it is built)."""
    return name in REGISTRY or name.startswith("torchvision:") or bool(_USER.match(name))


def family_of(name: str) -> str:
    if name.startswith("torchvision:"):
        return "torchvision"
    if ":" in name:
        return "custom"
    if name in GENERATORS:
        return "generator"
    if name in DETECTORS:
        return "yolact"
    return next((f for f in ("repvgg", "mobilenetv2", "resnet") if name.startswith(f)), "custom")


def _check_args(name: str, num_classes, in_channels, resolution) -> None:
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("resolution", resolution)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PasError(f"{key} must be a positive integer, got {value!r}")


def _construct(name: str, *, num_classes: int, in_channels: int, resolution: int) -> nn.Module:
    """The training-form module of `name` (no graph yet)."""
    _check_args(name, num_classes, in_channels, resolution)
    if name in REGISTRY:
        model = REGISTRY[name](num_classes=num_classes, in_channels=in_channels, resolution=resolution)
        spec = getattr(model, "spec", None)
        strides = getattr(spec, "strides", None) or ([spec.stem_stride] + [b.stride for b in spec.blocks] if spec else None)
        if strides and resolution < minimum_resolution(strides):
            raise PasError(f"resolution {resolution} is too small for {name}: its "
                           f"{sum(s == 2 for s in strides)} stride-2 layers need at least {minimum_resolution(strides)}")
        return model
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], num_classes=num_classes, in_channels=in_channels)
    if _USER.match(name):
        return _user(name, num_classes=num_classes, in_channels=in_channels)
    raise PasError(f"unknown model {name!r}; known models: {', '.join(names())}, torchvision:NAME, or "
                   f"module.path:function")


def _torchvision(arch: str, *, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise PasError(f"torchvision has no classification model {arch!r}; expected one of "
                       f"torchvision.models.list_models(), e.g. resnet50, mobilenet_v3_small, efficientnet_b0")
    kwargs = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:  # torchvision's networks take RGB: the stem conv is rebuilt for the input
        name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        new = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                        stem.dilation, 1, stem.bias is not None, stem.padding_mode)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _user(spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    import os
    import sys
    module, fn = spec.split(":")
    if os.getcwd() not in sys.path:  # the `pas` command does not put the working directory on the path
        sys.path.insert(0, os.getcwd())
    try:
        builder = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise PasError(f"backbone {spec!r} cannot be imported ({type(e).__name__}: {e}); expected "
                       f"'module.path:function' importable from the working directory") from None
    model = builder(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise PasError(f"backbone {spec!r} returned a {type(model).__name__}; expected a torch.nn.Module")
    return model


@lru_cache(maxsize=64)
def _graph(name: str, num_classes: int, in_channels: int, resolution: int):
    # our own builders run on the meta device (no weights allocated); others may compute with
    # tensors while building (torchvision's RegNet does), so they are built for real
    device = "meta" if name in REGISTRY else "cpu"
    # the random state is left as it was: a seeded build gives the same weights whether or not
    # this graph was cached (initialisers draw from it even on the meta device)
    with torch.random.fork_rng(devices=[]):
        with torch.device(device):
            model = _construct(name, num_classes=num_classes, in_channels=in_channels, resolution=resolution)
        return channel_graph(model, (in_channels, resolution, resolution)), _policy(model)


def _policy(model: nn.Module):
    return getattr(model, "pas_searchable", None)


def arch_for(name: str, *, num_classes: int = 1000, in_channels: int = 3, resolution: int = 224) -> Network:
    """The searchable view of a network at this input size and class count (no weights allocated)."""
    _check_args(name, num_classes, in_channels, resolution)
    graph, policy = _graph(name, num_classes, in_channels, resolution)
    return Network(graph, searched_groups(graph, policy), backbone=name, family=family_of(name),
                   in_channels=in_channels, num_classes=num_classes, resolution=resolution)


def build(name: str, *, num_classes: int = 1000, in_channels: int = 3, resolution: int = 224,
          deploy: bool = False) -> nn.Module:
    """The training-form network, with `.arch` (its Network) attached; `deploy=True`: the plain
    deployed form at full width (fused blocks, BN folded), e.g. to load deploy-form weights."""
    if deploy:
        return build_deployed(arch_for(name, num_classes=num_classes, in_channels=in_channels,
                                       resolution=resolution))
    model = _construct(name, num_classes=num_classes, in_channels=in_channels, resolution=resolution)
    model.arch = arch_for(name, num_classes=num_classes, in_channels=in_channels, resolution=resolution)
    return model


def build_deployed(net: Network) -> nn.Module:
    """The plain deployed network of `net` (fused, every searched group at its width), weights
    uninitialised: the shape `pas.deploy.load_deployed` loads weights into."""
    from pas.compact import compact
    model = build(net.backbone, num_classes=net.num_classes, in_channels=net.in_channels,
                  resolution=net.resolution)
    return compact(model.eval(), net.block_masks())


def network_from_dict(d: dict) -> Network:
    """Inverse of Network.to_dict, with a clear error for anything else."""
    from pas.graph.network import NETWORK_FORMAT
    if not isinstance(d, dict) or d.get("format") != NETWORK_FORMAT:
        got = d.get("format", d.get("family")) if isinstance(d, dict) else type(d).__name__
        raise PasError(f"architecture format {got!r} is unknown; expected {NETWORK_FORMAT!r} (arch.json written "
                       f"by pas deploy)")
    try:
        net = arch_for(d["backbone"], num_classes=int(d["num_classes"]), in_channels=int(d["in_channels"]),
                       resolution=int(d["resolution"]))
        return net.with_widths(d["widths"])
    except (KeyError, TypeError, ValueError) as e:
        raise PasError(f"malformed architecture: {type(e).__name__}: {e}") from None
