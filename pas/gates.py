"""Depth-wise binary convolution (DBC) gates and the MACs of the gated sub-network.

A gate holds one weight v per channel (a depth-wise 1x1 conv without bias, written as a channel-wise
product). Forward: b = 1[v > 0.5]. Backward: plain straight-through, dL/dv = dL/db, with no clipping,
so a channel below the threshold keeps receiving gradient and can come back. Weight decay applies to
v like to any weight.
"""
from __future__ import annotations

import torch
from torch import nn

from pas.errors import PasError
from pas.graph.network import Network

THRESHOLD = 0.5


def binary_mask(v: torch.Tensor, min_channels: int = 1) -> torch.Tensor:
    """1[v > 0.5] in the forward pass, the identity in the backward pass (straight-through).

    At least `min_channels` channels stay on: if fewer pass the threshold, the largest weights are
    kept, so a layer never collapses to zero width.
    """
    hard = v.detach() > THRESHOLD
    k = min(min_channels, v.numel())
    if int(hard.sum()) < k:
        hard[torch.topk(v.detach(), k).indices] = True
    return hard.to(v.dtype) + (v - v.detach())


class DBCGate(nn.Module):
    def __init__(self, channels: int, *, min_channels: int = 1, init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init)))
        self.min_channels = min_channels

    def mask(self) -> torch.Tensor:
        return binary_mask(self.weight, self.min_channels)

    def kept(self) -> torch.Tensor:
        """Kept channel count, differentiable through the estimator."""
        return self.mask().sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask().view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.weight.numel()}, min_channels={self.min_channels}"


GATES_ATTR = "pas_gates"  # the model attribute holding the gates: their names start with it


def network_of(model: nn.Module) -> Network:
    """The searchable view of `model` (set by `pas.models.build` or `pas.api.prepare`)."""
    net = getattr(model, "arch", None)
    if not isinstance(net, Network):
        raise PasError(f"{type(model).__name__} has no channel graph; build it with pas.models.build or pass "
                       f"it through pas.api.prepare(model, example_input)")
    return net


class _MaskSpec:
    """The mask of one gated module's output: the gates of its channel segments (None: kept)."""

    def __init__(self, parts):
        self.parts = parts  # [(DBCGate | None, channels)]

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        pieces = [g.mask() if g is not None else torch.ones(n, device=like.device) for g, n in self.parts]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(like.dtype)


def _apply_mask(module, args, output):
    m = module._pas_mask.mask(output)
    return output * m.view(1, -1, *([1] * (output.dim() - 2)))


def _masked_norm_forward(self, x):
    """BN(x) * b computed as BN with gamma * b and beta * b: the same values and gradients (the
    mask's gradient comes out of BN's own reductions for gamma and beta), without another pass over
    the activations. The base class's forward runs unchanged (BatchNorm2d, SyncBatchNorm, ...)."""
    weight, bias = self._parameters["weight"], self._parameters["bias"]
    m = self._pas_mask.mask(weight)
    self._parameters["weight"], self._parameters["bias"] = weight * m, bias * m
    try:
        return self._pas_base.forward(self, x)
    finally:
        self._parameters["weight"], self._parameters["bias"] = weight, bias


_MASKED_NORMS: dict[type, type] = {}


def _masked_norm_class(cls: type) -> type:
    if cls not in _MASKED_NORMS:  # same module name: torch.fx still sees a torch.nn leaf
        _MASKED_NORMS[cls] = type(f"Gated{cls.__name__}", (cls,), {
            "forward": _masked_norm_forward, "_pas_base": cls, "__module__": cls.__module__})
    return _MASKED_NORMS[cls]


def attach_gates(model: nn.Module, *, min_channels: int = 1) -> list[DBCGate]:
    """One fresh DBC gate (all channels on) per searched channel group, applied by a forward hook at
    every module whose output carries the group's channels (a conv's BN, a fused block, ...)."""
    net = network_of(model)
    detach_gates(model)
    device = _device_of(model)
    gates = nn.ModuleList(DBCGate(g.size, min_channels=min_channels) for g in net.groups()).to(device)
    setattr(model, GATES_ATTR, gates)
    by_group = dict(zip(net.searched, gates))
    for point in net.graph.mask_points:
        parts = [(by_group.get(gi), n) for gi, n in net.graph.layout_groups(point.layout)]
        if all(g is None for g, _ in parts):
            continue
        site = model.get_submodule(point.module)
        site._pas_mask = _MaskSpec(parts)
        if isinstance(site, nn.modules.batchnorm._BatchNorm) and site.affine:
            site.__class__ = _masked_norm_class(type(site))
        else:
            site._pas_hook = site.register_forward_hook(_apply_mask)
    return list(gates)


def gates_of(model: nn.Module) -> list[DBCGate]:
    gates = getattr(model, GATES_ATTR, None)
    if gates is None:
        raise ValueError("this model has no gates attached (call attach_gates first)")
    return list(gates)


def has_gates(model: nn.Module) -> bool:
    return getattr(model, GATES_ATTR, None) is not None


def detach_gates(model: nn.Module) -> None:
    for m in model.modules():
        if "_pas_hook" in m.__dict__:
            m._pas_hook.remove()
            del m.__dict__["_pas_hook"]
        if "_pas_base" in type(m).__dict__:
            m.__class__ = type(m)._pas_base
        m.__dict__.pop("_pas_mask", None)
    if GATES_ATTR in model._modules:
        del model._modules[GATES_ATTR]


def freeze_gates(model: nn.Module) -> None:
    """Fix the masks: gate weights get no gradient (and hence no weight decay) from now on."""
    for gate in gates_of(model):
        gate.weight.requires_grad_(False)


def masks(model: nn.Module) -> list[torch.Tensor]:
    """Current binary masks (bool), one per searched group."""
    return [g.mask().detach() > 0.5 for g in gates_of(model)]


def set_masks(model: nn.Module, new_masks, *, min_channels: int = 1) -> list[DBCGate]:
    """Attach gates that realise the given masks exactly (weights 1.0 on, 0.0 off)."""
    gates = attach_gates(model, min_channels=min_channels)
    for gate, m in zip(gates, new_masks, strict=True):
        with torch.no_grad():
            gate.weight.copy_(torch.as_tensor(m, dtype=torch.bool).to(gate.weight.device).float())
    return gates


def kept_widths(model: nn.Module) -> list[int]:
    return [int(g.kept().detach()) for g in gates_of(model)]


def gated_macs(model: nn.Module, net: Network | None = None) -> torch.Tensor:
    """MACs of the sub-network the gates select, through the one shared formula (differentiable)."""
    net = net or network_of(model)
    return net.gated_macs([g.kept() for g in gates_of(model)])


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
