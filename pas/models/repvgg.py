"""RepVGG (Ding et al., CVPR 2021): multi-branch blocks for training, plain 3x3 convs for deploy."""
from __future__ import annotations

import torch
from torch import nn

from pas.arch import RepVGGArch
from pas.models.layers import ConvAct
from pas.reparam import fold_bn, fused_conv, identity_kernel, pad_to


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


class RepVGGBlock(nn.Module):
    """ReLU(BN(3x3) + BN(1x1) + BN(identity)); identity only where C_in == C_out and stride 1."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, groups: int = 1):
        super().__init__()
        self.rbr_dense = _conv_bn(c_in, c_out, 3, stride, groups)
        self.rbr_1x1 = _conv_bn(c_in, c_out, 1, stride, groups)
        self.rbr_identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.act(y)

    def output_bns(self) -> list[nn.BatchNorm2d]:
        """The BNs that scale the block's output channels (BN-gamma ranking); the identity's does not."""
        return [self.rbr_dense[1], self.rbr_1x1[1]]

    @torch.no_grad()
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel and bias equal to the sum of the three branches (eval mode)."""
        conv3, bn3 = self.rbr_dense
        conv1, bn1 = self.rbr_1x1
        w3, b3 = fold_bn(conv3.weight, None, bn3)
        w1, b1 = fold_bn(conv1.weight, None, bn1)
        weight, bias = w3 + pad_to(w1, 3), b3 + b1
        if self.rbr_identity is not None:
            eye = identity_kernel(conv3.out_channels, conv3.groups, 3, like=w3)
            wi, bi = fold_bn(eye, None, self.rbr_identity)
            weight, bias = weight + wi, bias + bi
        return weight, bias

    def fuse(self) -> ConvAct:
        weight, bias = self.fused_kernel_bias()
        return ConvAct(fused_conv(self.rbr_dense[0], weight, bias), "relu")


class RepVGG(nn.Module):
    """Blocks (training form) or ConvAct layers (deploy form), global average pool, classifier."""

    def __init__(self, arch: RepVGGArch, *, deploy: bool = False):
        super().__init__()
        self.spec = arch
        layers, c_in = [], arch.in_channels
        for w, s, g in zip(arch.widths, arch.strides, arch.groups):
            if deploy:
                conv = nn.Conv2d(c_in, w, 3, s, 1, groups=g, bias=True)
                layers.append(ConvAct(conv, "relu"))
            else:
                layers.append(RepVGGBlock(c_in, w, stride=s, groups=g))
            c_in = w
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, arch.num_classes)

    def forward(self, x):
        x = self.blocks(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def repvgg_arch(*, a: float, b: float, blocks: tuple[int, ...], base: tuple[int, ...] = (64, 64, 128, 256, 512),
                groups: int = 1, grouped_layers: tuple[int, ...] = (), strides: tuple[int, ...] | None = None,
                in_channels: int = 3, num_classes: int = 1000, resolution: int = 224) -> RepVGGArch:
    """The RepVGG recipe: stage widths [min(base0, base1*a), base2*a, base3*a, base4*a, base5*b]...

    `base` is (stem cap, stage-1, stage-2, stage-3, stage-4) and is (64, 64, 128, 256, 512) for the
    published family; `strides` gives each stage's first stride (default 2 everywhere).
    """
    stage_widths = [min(base[0], int(base[1] * a)), int(base[1] * a), int(base[2] * a),
                    int(base[3] * a), int(base[4] * b)]
    strides = strides or (2,) * len(blocks)
    widths, layer_strides = [], []
    for width, n, stride in zip(stage_widths, blocks, strides):
        widths += [width] * n
        layer_strides += [stride] + [1] * (n - 1)
    layer_groups = [groups if i in grouped_layers else 1 for i in range(len(widths))]
    return RepVGGArch(in_channels=in_channels, num_classes=num_classes, resolution=resolution,
                      widths=tuple(widths), strides=tuple(layer_strides), groups=tuple(layer_groups))
