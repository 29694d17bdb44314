"""MobileNetV2 (Sandler et al., 2018) in torchvision's layout; the expanded widths are searchable."""
from __future__ import annotations

import torch
from torch import nn

from pas.arch import InvertedResidual, MobileNetV2Arch
from pas.models.layers import ConvAct, ConvBNAct

# torchvision's inverted-residual setting: expansion t, channels c, repeats n, first stride s.
TORCHVISION_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding of scaled widths (never more than 10% below the scaled value)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def mobilenetv2_arch(*, width_mult: float = 1.0, setting=TORCHVISION_SETTING, stem_stride: int = 2,
                     last_width: int = 1280, in_channels: int = 3, num_classes: int = 1000,
                     resolution: int = 224) -> MobileNetV2Arch:
    stem = make_divisible(32 * width_mult)
    last = make_divisible(last_width * max(1.0, width_mult))
    blocks, c_in = [], stem
    for t, c, n, s in setting:
        c_out = make_divisible(c * width_mult)
        for i in range(n):
            hidden = int(round(c_in * t))
            blocks.append(InvertedResidual(c_in, hidden, c_out, s if i == 0 else 1, t != 1))
            c_in = c_out
    return MobileNetV2Arch(in_channels=in_channels, num_classes=num_classes, resolution=resolution,
                           stem_width=stem, stem_stride=stem_stride, blocks=tuple(blocks),
                           last_width=last)


def _conv(c_in, c_out, kernel, stride, groups, act, deploy) -> nn.Module:
    if deploy:
        return ConvAct(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups), act)
    return ConvBNAct(c_in, c_out, kernel, stride=stride, groups=groups, act=act)


class InvertedResidualBlock(nn.Module):
    """[expand 1x1 + ReLU6 + gate] -> depth-wise 3x3 + ReLU6 -> project 1x1 (linear) (+ identity)."""

    def __init__(self, spec: InvertedResidual, *, deploy: bool = False):
        super().__init__()
        self.residual = spec.residual
        h = spec.hidden
        self.expand = _conv(spec.in_width, h, 1, 1, 1, "relu6", deploy) if spec.expand else None
        self.depthwise = _conv(h, h, 3, spec.stride, h, "relu6", deploy)
        self.project = _conv(h, spec.out_width, 1, 1, 1, None, deploy)

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, arch: MobileNetV2Arch, *, deploy: bool = False, dropout: float = 0.2):
        super().__init__()
        self.spec = arch
        self.stem = _conv(arch.in_channels, arch.stem_width, 3, arch.stem_stride, 1, "relu6", deploy)
        self.blocks = nn.Sequential(*(InvertedResidualBlock(b, deploy=deploy) for b in arch.blocks))
        self.head = _conv(arch.blocks[-1].out_width, arch.last_width, 1, 1, 1, "relu6", deploy)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(arch.last_width, arch.num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))

    def pas_searchable(self, group) -> bool:
        """Only the expanded hidden widths are searched (the paper's PaS-light): a gate after each
        expansion 1x1 (+BN+ReLU6); the residual trunks keep their widths."""
        return group.producers[0].endswith(".expand")
