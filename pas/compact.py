"""From a masked multi-branch network to a compact plain one: fuse, then cut masked channels out.

Removing output rows of layer l and the matching input columns of layer l+1 is exact because a
masked channel is zero everywhere after the gate. MobileNetV2 has one subtlety: a masked hidden
channel enters the depth-wise conv as zeros and leaves it as the constant ReLU6(bias); that
constant reaches the projection, so it is folded into the projection's bias instead of being lost.
"""
from __future__ import annotations

import torch
from torch import nn

from pas.arch import MobileNetV2Arch, RepVGGArch
from pas.gates import masks
from pas.models import build_model
from pas.reparam import reparameterize


def compact(model: nn.Module, mask_list: list[torch.Tensor] | None = None) -> nn.Module:
    """The compact deploy network equal (in eval mode) to the masked `model`.

    `mask_list` defaults to the masks of the gates attached to `model`.
    """
    keep = [m.bool().cpu() for m in (masks(model) if mask_list is None else mask_list)]
    arch = model.arch.with_widths([int(m.sum()) for m in keep])
    fused = reparameterize(model).eval()
    out = build_model(arch, deploy=True).eval()
    with torch.no_grad():
        if isinstance(arch, RepVGGArch):
            _compact_repvgg(fused, out, keep)
        elif isinstance(arch, MobileNetV2Arch):
            _compact_mobilenetv2(fused, out, keep)
        else:
            raise TypeError(f"cannot compact {type(arch).__name__}")
    return out.to(next(model.parameters()).device)


def _copy_conv(dst: nn.Conv2d, src: nn.Conv2d, rows=None, cols=None, bias_extra=None) -> None:
    w, b = src.weight, src.bias
    if rows is not None:
        w, b = w[rows], b[rows]
    if cols is not None:
        w = w[:, cols]
    dst.weight.copy_(w)
    dst.bias.copy_(b if bias_extra is None else b + bias_extra)


def _compact_repvgg(fused: nn.Module, out: nn.Module, keep: list[torch.Tensor]) -> None:
    prev = None
    for src, dst, k in zip(fused.blocks, out.blocks, keep, strict=True):
        _copy_conv(dst.conv, src.conv, rows=k, cols=prev)
        prev = k
    out.fc.weight.copy_(fused.fc.weight[:, prev])
    out.fc.bias.copy_(fused.fc.bias)


def _compact_mobilenetv2(fused: nn.Module, out: nn.Module, keep: list[torch.Tensor]) -> None:
    for name in ("stem", "head"):
        _copy_conv(getattr(out, name).conv, getattr(fused, name).conv)
    out.fc.load_state_dict(fused.fc.state_dict())
    masks_iter = iter(keep)
    for src, dst in zip(fused.blocks, out.blocks, strict=True):
        if src.expand is None:
            for name in ("depthwise", "project"):
                _copy_conv(getattr(dst, name).conv, getattr(src, name).conv)
            continue
        k = next(masks_iter)
        _copy_conv(dst.expand.conv, src.expand.conv, rows=k)
        _copy_conv(dst.depthwise.conv, src.depthwise.conv, rows=k)
        # Masked hidden channels leave the depth-wise conv as the constant ReLU6(bias).
        dead = ~k
        constant = src.depthwise.act(src.depthwise.conv.bias[dead].clone())
        extra = src.project.conv.weight[:, dead, 0, 0] @ constant
        _copy_conv(dst.project.conv, src.project.conv, cols=k, bias_extra=extra)

