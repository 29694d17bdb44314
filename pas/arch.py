"""The recipes of the hand-written families as plain data: what their builders read.

A RepVGG is a stack of 3x3 blocks (widths, strides, groups per layer); a MobileNetV2 a stem,
inverted-residual blocks and a last 1x1 conv. Their MACs, parameters and searchable widths are not
here: every network's come from its traced channel graph (`pas.graph`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pas.errors import PasError


def minimum_resolution(strides: Sequence[int]) -> int:
    """Smallest input side for which every stride-2 layer still sees a map at least 2 pixels wide."""
    n = sum(1 for s in strides if s == 2)
    return 2 ** (n - 1) + 1 if n else 1


@dataclass(frozen=True)
class RepVGGArch:
    """A plain stack of 3x3 convs (each + ReLU), global average pooling and a classifier."""

    in_channels: int
    num_classes: int
    resolution: int
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    groups: tuple[int, ...]

    def __post_init__(self):
        n = len(self.widths)
        if n == 0 or len(self.strides) != n or len(self.groups) != n:
            raise PasError(f"repvgg architecture needs equally long widths/strides/groups, got "
                           f"{len(self.widths)}/{len(self.strides)}/{len(self.groups)}")
        for i, (w, g) in enumerate(zip(self.widths, self.groups)):
            c_in = self.in_channels if i == 0 else self.widths[i - 1]
            if w < 1 or g < 1 or w % g or c_in % g:
                raise PasError(f"layer {i}: width {w} with groups {g} and input width {c_in} is not "
                               f"a valid grouped conv (widths >= 1, divisible by groups)")


@dataclass(frozen=True)
class InvertedResidual:
    """One MobileNetV2 block: [1x1 expand] -> 3x3 depth-wise -> 1x1 project (+ identity)."""

    in_width: int
    hidden: int
    out_width: int
    stride: int
    expand: bool

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_width == self.out_width


@dataclass(frozen=True)
class MobileNetV2Arch:
    """MobileNetV2 in torchvision's layout."""

    in_channels: int
    num_classes: int
    resolution: int
    stem_width: int
    stem_stride: int
    blocks: tuple[InvertedResidual, ...]
    last_width: int

    def __post_init__(self):
        prev = self.stem_width
        for i, b in enumerate(self.blocks):
            if b.in_width != prev:
                raise PasError(f"block {i}: in_width {b.in_width} != previous output {prev}")
            if b.hidden < 1 or (not b.expand and b.hidden != b.in_width):
                raise PasError(f"block {i}: hidden width {b.hidden} is invalid")
            prev = b.out_width
