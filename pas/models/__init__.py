"""The model registry: every searchable backbone by name, and the builder from an architecture.

    arch = pas.models.arch_for("repvgg_b1", num_classes=1000, in_channels=3, resolution=224)
    net = pas.models.build("repvgg_b1", num_classes=1000)          # training (multi-branch) form
    plain = pas.models.build_model(arch, deploy=True)              # any widths, deploy form
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from pas.arch import Architecture, MobileNetV2Arch, RepVGGArch, minimum_resolution
from pas.errors import PasError
from pas.models.mobilenetv2 import MobileNetV2, mobilenetv2_arch
from pas.models.repvgg import RepVGG, repvgg_arch

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

ArchFactory = Callable[..., Architecture]


def _repvgg(variant: str, groups: int = 1, mini: bool = False) -> ArchFactory:
    a, b = MULTIPLIERS[variant]
    blocks = (MINI_B_BLOCKS if mini else B_BLOCKS) if variant[0] == "b" else (MINI_A_BLOCKS if mini else A_BLOCKS)
    extra = dict(base=MINI_BASE, strides=MINI_STRIDES) if mini else {}
    return lambda **kw: repvgg_arch(a=a, b=b, blocks=blocks, groups=groups,
                                    grouped_layers=GROUPED_LAYERS if groups > 1 else (), **extra, **kw)


def _mbv2(width_mult: float, mini: bool = False) -> ArchFactory:
    extra = dict(setting=MINI_MBV2_SETTING, stem_stride=2, last_width=256) if mini else {}
    return lambda **kw: mobilenetv2_arch(width_mult=width_mult, **extra, **kw)


REGISTRY: dict[str, ArchFactory] = {
    **{f"repvgg_{v}": _repvgg(v) for v in MULTIPLIERS},
    "repvgg_b1g2": _repvgg("b1", 2), "repvgg_b1g4": _repvgg("b1", 4), "repvgg_b2g4": _repvgg("b2", 4),
    **{f"repvgg_{v}_mini": _repvgg(v, mini=True) for v in ("a0", "a1", "b0", "b1")},
    "mobilenetv2_100": _mbv2(1.0), "mobilenetv2_075": _mbv2(0.75), "mobilenetv2_050": _mbv2(0.5),
    "mobilenetv2_mini": _mbv2(0.5, mini=True), "mobilenetv2_mini_035": _mbv2(0.35, mini=True),
}


def names() -> list[str]:
    return sorted(REGISTRY)


def arch_for(name: str, *, num_classes: int = 1000, in_channels: int = 3, resolution: int = 224) -> Architecture:
    """The deploy architecture of a registered network at this input size and class count."""
    if name not in REGISTRY:
        raise PasError(f"unknown model {name!r}; known models: {', '.join(names())}")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("resolution", resolution)):
        if not isinstance(value, int) or value < 1:
            raise PasError(f"{key} must be a positive integer, got {value!r}")
    # Check the resolution against the recipe's strides before building, to name the model.
    probe = REGISTRY[name](num_classes=num_classes, in_channels=in_channels, resolution=10**6)
    strides = probe.strides if isinstance(probe, RepVGGArch) else [probe.stem_stride] + [b.stride for b in probe.blocks]
    need = minimum_resolution(strides)
    if resolution < need:
        raise PasError(f"resolution {resolution} is too small for {name}: its "
                       f"{sum(s == 2 for s in strides)} stride-2 layers need at least {need}")
    return REGISTRY[name](num_classes=num_classes, in_channels=in_channels, resolution=resolution)


def build_model(arch: Architecture, *, deploy: bool = False) -> nn.Module:
    """Training (multi-branch, BN) or deploy (plain, biased convs) network for an architecture."""
    if isinstance(arch, RepVGGArch):
        return RepVGG(arch, deploy=deploy)
    if isinstance(arch, MobileNetV2Arch):
        return MobileNetV2(arch, deploy=deploy)
    raise PasError(f"cannot build a network from {type(arch).__name__}")


def build(name: str, *, num_classes: int = 1000, in_channels: int = 3, resolution: int = 224,
          deploy: bool = False) -> nn.Module:
    arch = arch_for(name, num_classes=num_classes, in_channels=in_channels, resolution=resolution)
    return build_model(arch, deploy=deploy)
