"""Architectures as plain data: per-layer widths, strides and groups, serialisable to JSON.

A searched network is nothing but one of these with other widths, so everything that needs a
network's shape (MACs, params, the widths builder, the reports) reads it from here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from pas.errors import PasError
from pas.macs import conv_macs, conv_out_size, depthwise_macs, fc_macs


def minimum_resolution(strides: Sequence[int]) -> int:
    """Smallest input side for which every stride-2 layer still sees a map at least 2 pixels wide."""
    n = sum(1 for s in strides if s == 2)
    return 2 ** (n - 1) + 1 if n else 1


def _check_resolution(name: str, resolution: int, strides: Sequence[int]) -> None:
    need = minimum_resolution(strides)
    if resolution < need:
        n = sum(1 for s in strides if s == 2)
        raise PasError(f"resolution {resolution} is too small for {name}: its {n} stride-2 layers "
                       f"need at least {need}")


@dataclass(frozen=True)
class RepVGGArch:
    """A plain stack of 3x3 convs (each + ReLU), global average pooling and a classifier."""

    in_channels: int
    num_classes: int
    resolution: int
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    groups: tuple[int, ...]
    family: str = "repvgg"

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
        _check_resolution("this repvgg architecture", self.resolution, self.strides)

    def feature_sizes(self) -> list[int]:
        """Output side of every layer."""
        sizes, size = [], self.resolution
        for s in self.strides:
            size = conv_out_size(size, s)
            sizes.append(size)
        return sizes

    def searchable_widths(self) -> list[int]:
        return list(self.widths)

    def searchable_groups(self) -> list[int]:
        return list(self.groups)

    def searchable_sizes(self) -> list[int]:
        """Output side of every searchable layer (the resolution its channels live at)."""
        return self.feature_sizes()

    def with_widths(self, widths: Sequence[int]) -> "RepVGGArch":
        return replace(self, widths=tuple(int(w) for w in widths))

    def macs(self, widths=None):
        """Deploy MACs; `widths` (ints or tensors) overrides the searchable widths."""
        widths = list(self.widths) if widths is None else list(widths)
        total, c_in = 0, self.in_channels
        for w, g, size in zip(widths, self.groups, self.feature_sizes()):
            total = total + conv_macs(c_in, w, 3, size, size, g)
            c_in = w
        return total + fc_macs(c_in, self.num_classes)

    def params(self) -> int:
        """Deploy parameters: fused 3x3 kernels with bias, classifier with bias."""
        total, c_in = 0, self.in_channels
        for w, g in zip(self.widths, self.groups):
            total += w * (c_in // g) * 9 + w
            c_in = w
        return total + c_in * self.num_classes + self.num_classes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(widths=list(self.widths), strides=list(self.strides), groups=list(self.groups))
        return d


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
    """MobileNetV2 in torchvision's layout; the expanded hidden widths are the searchable ones."""

    in_channels: int
    num_classes: int
    resolution: int
    stem_width: int
    stem_stride: int
    blocks: tuple[InvertedResidual, ...]
    last_width: int
    family: str = "mobilenetv2"

    def __post_init__(self):
        prev = self.stem_width
        for i, b in enumerate(self.blocks):
            if b.in_width != prev:
                raise PasError(f"block {i}: in_width {b.in_width} != previous output {prev}")
            if b.hidden < 1 or (not b.expand and b.hidden != b.in_width):
                raise PasError(f"block {i}: hidden width {b.hidden} is invalid")
            prev = b.out_width
        _check_resolution("this mobilenetv2 architecture", self.resolution,
                          [self.stem_stride] + [b.stride for b in self.blocks])

    def block_sizes(self) -> tuple[int, list[int]]:
        """Stem output side and the output side of every block."""
        stem = conv_out_size(self.resolution, self.stem_stride)
        sizes, size = [], stem
        for b in self.blocks:
            size = conv_out_size(size, b.stride)
            sizes.append(size)
        return stem, sizes

    def searchable_widths(self) -> list[int]:
        return [b.hidden for b in self.blocks if b.expand]

    def searchable_groups(self) -> list[int]:
        return [1] * len(self.searchable_widths())

    def searchable_sizes(self) -> list[int]:
        """Output side of every block with a searchable hidden width (its depth-wise conv's)."""
        _, sizes = self.block_sizes()
        return [size for b, size in zip(self.blocks, sizes) if b.expand]

    def with_widths(self, widths: Sequence[int]) -> "MobileNetV2Arch":
        it = iter(int(w) for w in widths)
        blocks = tuple(replace(b, hidden=next(it)) if b.expand else b for b in self.blocks)
        return replace(self, blocks=blocks)

    def macs(self, widths=None):
        """Deploy MACs; `widths` (ints or tensors) overrides the expanded hidden widths."""
        it = iter(self.searchable_widths() if widths is None else widths)
        stem, sizes = self.block_sizes()
        total = conv_macs(self.in_channels, self.stem_width, 3, stem, stem)
        size_in = stem
        for b, size in zip(self.blocks, sizes):
            hidden = next(it) if b.expand else b.in_width
            if b.expand:
                total = total + conv_macs(b.in_width, hidden, 1, size_in, size_in)
            total = total + depthwise_macs(hidden, 3, size, size)
            total = total + conv_macs(hidden, b.out_width, 1, size, size)
            size_in = size
        total = total + conv_macs(self.blocks[-1].out_width, self.last_width, 1, size_in, size_in)
        return total + fc_macs(self.last_width, self.num_classes)

    def params(self) -> int:
        """Deploy parameters: BN folded into every conv (weight + bias), classifier with bias."""
        total = self.stem_width * self.in_channels * 9 + self.stem_width
        for b in self.blocks:
            if b.expand:
                total += b.hidden * b.in_width + b.hidden
            total += b.hidden * 9 + b.hidden
            total += b.out_width * b.hidden + b.out_width
        total += self.last_width * self.blocks[-1].out_width + self.last_width
        return total + self.last_width * self.num_classes + self.num_classes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return d


Architecture = RepVGGArch | MobileNetV2Arch
_FAMILIES = {"repvgg": RepVGGArch, "mobilenetv2": MobileNetV2Arch}


def arch_from_dict(d: dict) -> Architecture:
    """Inverse of `to_dict`, with a clear error for anything that is not an architecture."""
    if not isinstance(d, dict) or d.get("family") not in _FAMILIES:
        got = d.get("family") if isinstance(d, dict) else type(d).__name__
        raise PasError(f"architecture family {got!r} is unknown; expected one of {sorted(_FAMILIES)}")
    d = dict(d)
    try:
        if d["family"] == "repvgg":
            for k in ("widths", "strides", "groups"):
                d[k] = tuple(int(v) for v in d[k])
            return RepVGGArch(**d)
        d["blocks"] = tuple(InvertedResidual(**b) for b in d["blocks"])
        return MobileNetV2Arch(**d)
    except (KeyError, TypeError, ValueError) as e:
        raise PasError(f"malformed {d['family']} architecture: {e}") from None


def save_arch(arch: Architecture, path: str | Path) -> None:
    from pas.io import atomic_write_text
    atomic_write_text(path, json.dumps(arch.to_dict(), indent=2) + "\n")


def load_arch(path: str | Path) -> Architecture:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise PasError(f"architecture file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise PasError(f"architecture file {str(path)!r} is not valid JSON: {e}") from None
    return arch_from_dict(d)
