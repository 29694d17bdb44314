"""Structural reparameterization: the fusion arithmetic, and one walk that fuses any model.

Each fusable module has a `fuse()` method returning its plain replacement; `reparameterize`
walks a model and swaps every such module, so it knows no block types itself.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d, *, out_dim: int = 0):
    """Fold eval-mode BN into the preceding conv: W' = W*gamma/sigma, b' = beta + (b - mu)*gamma/sigma.

    `out_dim`: the weight's output-channel dimension, 0 for a conv (C_out, C_in/g, k, k), 1 for a
    transposed conv (C_in, C_out, k, k) (`out_dim_of`)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    return weight * scale.reshape(shape), bn.bias + (b - bn.running_mean) * scale


def out_dim_of(conv: nn.Module) -> int:
    """The output-channel dimension of a conv's weight: 1 for a transposed conv, 0 otherwise."""
    return 1 if isinstance(conv, nn.ConvTranspose2d) else 0


def pad_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a square kernel to size x size, keeping it centred (1x1 -> centre tap of 3x3)."""
    p = (size - kernel.shape[-1]) // 2
    return nn.functional.pad(kernel, [p, p, p, p])


def identity_kernel(channels: int, groups: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """A (C, C/g, k, k) kernel that copies every channel: 1 at [i, i mod C/g, k//2, k//2]."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, size, size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % per_group, size // 2, size // 2] = 1.0
    return kernel


def fused_conv(source: nn.Conv2d | nn.ConvTranspose2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A conv with `source`'s geometry (stride, padding, dilation, groups; a transposed source gives a
    transposed conv, with its output padding) and the given fused weight and bias; a kernel larger than
    the source's (1x1 -> 3x3) is centred with 'same' padding."""
    kernel = tuple(weight.shape[-2:])
    if isinstance(source, nn.ConvTranspose2d):
        conv = nn.ConvTranspose2d(source.in_channels, source.out_channels, kernel, source.stride, source.padding,
                                  source.output_padding, source.groups, bias=True, dilation=source.dilation)
    else:
        padding = source.padding if kernel == tuple(source.kernel_size) else (kernel[0] // 2, kernel[1] // 2)
        conv = nn.Conv2d(source.in_channels, source.out_channels, kernel, source.stride, padding,
                         dilation=source.dilation, groups=source.groups, bias=True, padding_mode=source.padding_mode)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def reparameterize(model: nn.Module) -> nn.Module:
    """Return a copy of `model` in which every module that can fuse itself has been fused."""
    model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    model = _fuse_children(model)
    return model.train(was_training)


def _fuse_children(module: nn.Module) -> nn.Module:
    if hasattr(module, "fuse"):
        return module.fuse()
    for name, child in module.named_children():
        setattr(module, name, _fuse_children(child))
    return module
