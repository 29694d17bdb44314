"""From a masked network to a compact one: fuse, then cut the masked channels of every group out.

One routine for every network. The fused network is traced again (`pas.graph.channels`); its
prunable groups correspond one to one, in graph order, to those of the training form. Every conv,
linear and norm layer then keeps the rows of its kept output channels and the columns of its kept
input channels (a transposed conv's weight is (C_in, C_out, k, k): there rows are inputs). This is
exact because a gate zeroes a masked channel wherever it is produced (after the BN that follows a
conv, after a fused block): what a masked channel contributes downstream is 0.

A grouped conv (g groups) stays one with g groups: its weight is (C_out, C_in/g, k, k) and output row
o reads the columns of its own input block o // (C_out/g). It needs every input block to keep the
same number k_in of channels and every output block the same number k_out (`pas.landing` lands on
such masks); then row o keeps the k_in columns kept in its own block, which may be other positions
than in the next block, and the compact weight is (g * k_out, k_in, k, k).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pas.errors import PasError
from pas.gates import _device_of, detach_gates, has_gates, masks, network_of
from pas.graph.channels import ChannelGraph, Layer, channel_graph
from pas.graph.network import Network
from pas.reparam import fold_bn, fused_conv, out_dim_of, reparameterize


def compact(model: nn.Module, mask_list: list[torch.Tensor] | None = None) -> nn.Module:
    """The compact deploy network equal (in eval mode) to the masked `model`.

    `mask_list` (one bool mask per searched group) defaults to the masks of the attached gates.
    The result carries `.arch`: the same network description with the kept widths.
    """
    net = network_of(model)
    keep = [m.bool().cpu() for m in (masks(model) if mask_list is None else mask_list)]
    widths = [int(m.sum()) for m in keep]
    fused = reparameterize(model).eval()
    if has_gates(fused):
        detach_gates(fused)
    fused = fused.cpu()
    graph = channel_graph(fused, net.graph.input_shape)
    group_keep = _keep_per_group(net, graph, keep)
    with torch.no_grad():
        fold_batchnorms(fused, graph)
        shrink(fused, graph, group_keep)
    fused.arch = net.with_widths(widths)
    return fused.to(_device_of(model))


def shrink(model: nn.Module, graph: ChannelGraph, group_keep: dict[int, torch.Tensor]) -> None:
    """Replace every conv, linear and norm layer of `model` by one holding only the kept channels.

    `group_keep` maps a prunable group's index in `graph` to its bool mask; other groups stay whole.
    """
    def keep_of(layout) -> torch.Tensor:
        parts = [group_keep.get(graph.space_group[s], torch.ones(graph.space_size[s], dtype=torch.bool))
                 for s in layout]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    for layer in graph.layers:
        old = model.get_submodule(layer.module)
        if layer.kind == "norm" and not isinstance(old, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                                                          nn.InstanceNorm2d)):
            continue  # folded into its conv
        new = _shrunk(old, layer, keep_of(layer.in_layout), keep_of(layer.out_layout))
        if new is not old:
            _replace(model, layer.module, new)


def fold_batchnorms(model: nn.Module, graph: ChannelGraph) -> None:
    """Fold every BN that directly follows a conv into that conv (eval statistics); the BN becomes
    an identity. The one BN fold of `pas.reparam`, applied to any traced network."""
    for layer in graph.layers:
        if layer.bn is None:
            continue
        conv, bn = model.get_submodule(layer.module), model.get_submodule(layer.bn)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        weight, bias = fold_bn(conv.weight, conv.bias, bn, out_dim=out_dim_of(conv))
        _replace(model, layer.module, fused_conv(conv, weight, bias))
        _replace(model, layer.bn, nn.Identity())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _keep_per_group(net: Network, fused: ChannelGraph, keep: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Masks per group of the fused graph: prunable groups of both forms match in order and size."""
    trained, deployed = net.graph.prunable(), fused.prunable()
    if [g.size for g in trained] != [g.size for g in deployed]:
        raise PasError(f"the fused {net.backbone} has prunable groups of widths {[g.size for g in deployed]}, "
                       f"the training form {[g.size for g in trained]}; expected fusion to keep every group")
    if len(keep) != len(net.searched):
        raise PasError(f"{len(keep)} masks given for {len(net.searched)} searched groups of {net.backbone}")
    position = {g.index: i for i, g in enumerate(trained)}
    out = {}
    for gi, m in zip(net.searched, keep):
        if m.numel() != net.graph.groups[gi].size:
            raise PasError(f"a mask of {m.numel()} channels for a group of {net.graph.groups[gi].size}")
        out[deployed[position[gi]].index] = m
    return out


def _shrunk(old: nn.Module, layer: Layer, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Module:
    if bool(keep_in.all()) and bool(keep_out.all()):
        return old
    if layer.kind == "norm":
        return _shrunk_norm(old, keep_out)
    if layer.kind == "linear":
        cols = keep_in.repeat_interleave(layer.factor)
        new = nn.Linear(int(cols.sum()), int(keep_out.sum()), bias=old.bias is not None)
        new.weight.copy_(old.weight[keep_out][:, cols])
        if old.bias is not None:
            new.bias.copy_(old.bias[keep_out])
        return new
    if layer.kind == "grouped":
        return _shrunk_grouped(old, layer, keep_in, keep_out)
    if layer.kind == "transposed":  # weight (C_in, C_out, kh, kw): rows are inputs, columns outputs
        new = nn.ConvTranspose2d(int(keep_in.sum()), int(keep_out.sum()), old.kernel_size, old.stride, old.padding,
                                 old.output_padding, bias=old.bias is not None, dilation=old.dilation)
        new.weight.copy_(old.weight[keep_in][:, keep_out])
        if old.bias is not None:
            new.bias.copy_(old.bias[keep_out])
        return new
    depthwise = layer.kind == "depthwise"
    c_in, c_out = int(keep_in.sum()), int(keep_out.sum())
    new = nn.Conv2d(c_in, c_out, old.kernel_size, old.stride, old.padding, old.dilation,
                    groups=c_out if depthwise else 1, bias=old.bias is not None, padding_mode=old.padding_mode)
    weight = old.weight[keep_out]
    new.weight.copy_(weight if depthwise else weight[:, keep_in])
    if old.bias is not None:
        new.bias.copy_(old.bias[keep_out])
    return new


def _per_block(keep: torch.Tensor, groups: int, layer: Layer, side: str) -> torch.Tensor:
    """The mask as (groups, channels per group), each group keeping the same count."""
    blocks = keep.view(groups, -1)
    counts = blocks.sum(1)
    if bool((counts != counts[0]).any()):
        raise PasError(f"grouped conv {layer.module} (groups={groups}) would keep {counts.tolist()} {side} channels "
                       f"per group; expected the same count in every group")
    return blocks


def _shrunk_grouped(old: nn.Conv2d, layer: Layer, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Conv2d:
    g = layer.groups
    rows = _per_block(keep_out, g, layer, "output")
    columns = _per_block(keep_in, g, layer, "input")
    new = nn.Conv2d(int(keep_in.sum()), int(keep_out.sum()), old.kernel_size, old.stride, old.padding, old.dilation,
                    groups=g, bias=old.bias is not None, padding_mode=old.padding_mode)
    weight = old.weight.view(g, -1, *old.weight.shape[1:])  # (group, row in group, column in group, kh, kw)
    new.weight.copy_(torch.cat([weight[i][rows[i]][:, columns[i]] for i in range(g)]))
    if old.bias is not None:
        new.bias.copy_(old.bias[keep_out])
    return new


def _shrunk_norm(old: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(old)
    n = int(keep.sum())
    for name in ("weight", "bias"):
        p = getattr(old, name, None)
        if p is not None:
            setattr(new, name, nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad))
    for name in ("running_mean", "running_var"):
        b = getattr(old, name, None)
        if b is not None:
            setattr(new, name, b[keep].clone())
    for attr in ("num_features", "num_channels"):
        if hasattr(new, attr):
            setattr(new, attr, n)
    return new

