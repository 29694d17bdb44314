"""A YOLACT-style instance-segmentation network (Bolya et al., 2019), small, and traceable end to end.

YOLACT predicts, at every anchor of every FPN level, class scores, a box and k mask coefficients,
and once per image k prototype masks; an instance's mask is sigmoid(prototypes . coefficients),
cropped to its box. Everything before that linear combination is convolutional, which is what
PaS needs: the channel graph sees backbone, FPN, prototype net and heads as one network.

Layout here (`YolactSpec`): a plain conv-BN-ReLU backbone with three outputs at strides 4, 8 and 16
(C3, C4, C5), an FPN (1x1 laterals, nearest up-sampling, added top-down, a 3x3 conv per level),
a prototype net on P3 (two 3x3 convs, x2 up-sampling, a 3x3 conv, a 1x1 conv to k prototypes at
stride 2), and one head per level (a 3x3 conv, then 3x3 predictors for the classes, the boxes and
the coefficients of each anchor). YOLACT shares one head across levels; separate heads cost the
same MACs and keep every conv called once, as a gate site must be.

One output tensor. The network returns every level's three prediction maps and the prototypes,
each flattened and concatenated into one (N, D) tensor, so that deployment, ONNX export, latency
and the compaction check treat it like a classifier's logits; `split_outputs` gives the pieces back
(`pas.segmentation` decodes them). The groups that reach this output (predictors, prototypes) keep
their widths; the FPN's laterals and up-sampled levels are added together, one group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

ASPECTS = (1.0, 0.5, 2.0)  # anchor aspect ratios (w / h), YOLACT's
STRIDES = (4, 8, 16)  # P3, P4, P5
ANCHOR_SCALE = 3.0  # anchor side = ANCHOR_SCALE * stride at aspect 1


@dataclass(frozen=True)
class YolactSpec:
    in_channels: int = 1
    num_classes: int = 10
    resolution: int = 64
    widths: tuple[int, ...] = (16, 24, 32, 64, 96)  # stem, then stages at strides 2, 4, 8, 16
    fpn: int = 32
    prototypes: int = 8

    @property
    def strides(self) -> tuple[int, ...]:
        """Of the stem and the four stages (the registry's resolution check reads them)."""
        return (1, 2, 2, 2, 2)

    @property
    def anchors(self) -> int:
        return len(ASPECTS)

    def level_sides(self) -> list[int]:
        return [self.resolution // s for s in STRIDES]

    def proto_side(self) -> int:
        return self.resolution // 2


def _cbr(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Yolact(nn.Module):
    def __init__(self, spec: YolactSpec):
        super().__init__()
        self.spec = spec
        w = spec.widths
        self.stem = _cbr(spec.in_channels, w[0])
        self.stages = nn.ModuleList(nn.Sequential(_cbr(a, b, 2), _cbr(b, b)) for a, b in zip(w[:-1], w[1:]))
        f, k, a = spec.fpn, spec.prototypes, spec.anchors
        self.laterals = nn.ModuleList(nn.Conv2d(c, f, 1) for c in w[2:])
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(f, f, 3, padding=1), nn.ReLU(inplace=True))
                                    for _ in STRIDES)
        self.proto = nn.Sequential(nn.Conv2d(f, f, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(f, f, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(f, f, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(f, k, 1), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(f, f, 3, padding=1), nn.ReLU(inplace=True))
                                   for _ in STRIDES)
        self.classes = nn.ModuleList(nn.Conv2d(f, a * spec.num_classes, 3, padding=1) for _ in STRIDES)
        self.boxes = nn.ModuleList(nn.Conv2d(f, a * 4, 3, padding=1) for _ in STRIDES)
        self.coefficients = nn.ModuleList(nn.Conv2d(f, a * k, 3, padding=1) for _ in STRIDES)
        prior = -4.6  # sigmoid(-4.6) = 0.01: the focal loss's prior for rare positives (RetinaNet)
        for c in self.classes:
            nn.init.constant_(c.bias, prior)

    def forward(self, x):
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:  # strides 4, 8, 16
                features.append(x)
        c3, c4, c5 = features
        p5 = self.laterals[2](c5)
        p4 = self.laterals[1](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.laterals[0](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        levels = [s(p) for s, p in zip(self.smooth, (p3, p4, p5))]
        out = []
        for i, p in enumerate(levels):
            h = self.heads[i](p)
            out += [torch.flatten(self.classes[i](h), 1), torch.flatten(self.boxes[i](h), 1),
                    torch.flatten(self.coefficients[i](h), 1)]
        out.append(torch.flatten(self.proto(levels[0]), 1))
        return torch.cat(out, 1)


def split_outputs(flat: torch.Tensor, spec: YolactSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flat output as (classes (N, anchors, C), boxes (N, anchors, 4), coefficients (N, anchors, k),
    prototypes (N, k, S, S)), anchors ordered level by level, then by position (row, column), then by
    aspect (`pas.segmentation.anchors` uses the same order)."""
    n, a, c, k = flat.shape[0], spec.anchors, spec.num_classes, spec.prototypes
    parts, start = {"classes": [], "boxes": [], "coefficients": []}, 0
    for side in spec.level_sides():
        for name, per in (("classes", c), ("boxes", 4), ("coefficients", k)):
            size = a * per * side * side
            block = flat[:, start:start + size].view(n, a, per, side, side)
            parts[name].append(block.permute(0, 3, 4, 1, 2).reshape(n, side * side * a, per))
            start += size
    s = spec.proto_side()
    protos = flat[:, start:start + k * s * s].view(n, k, s, s)
    if start + k * s * s != flat.shape[1]:
        raise ValueError(f"output of {flat.shape[1]} values does not fit {spec}")
    return (torch.cat(parts["classes"], 1), torch.cat(parts["boxes"], 1), torch.cat(parts["coefficients"], 1),
            protos)
