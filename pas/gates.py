"""Depth-wise binary convolution (DBC) gates and the MACs of the gated sub-network.

A gate holds one weight v per channel (a depth-wise 1x1 conv without bias, written as a channel-wise
product). Forward: b = 1[v > 0.5]. Backward: plain straight-through, dL/dv = dL/db, with no clipping,
so a channel below the threshold keeps receiving gradient and can come back. Weight decay applies to
v like to any weight.
"""
from __future__ import annotations

import torch
from torch import nn

from pas.arch import Architecture

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


def gate_sites(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are searchable, in the order of the architecture's widths."""
    if not hasattr(model, "gate_sites"):
        raise TypeError(f"{type(model).__name__} has no searchable layers (no gate_sites())")
    return model.gate_sites()


def attach_gates(model: nn.Module, *, min_channels: int = 1) -> list[DBCGate]:
    """Put a fresh DBC gate (all channels on) on every searchable layer; return them in order."""
    gates = []
    for site in gate_sites(model):
        site.gate = DBCGate(site.gate_channels, min_channels=min_channels).to(_device_of(site))
        gates.append(site.gate)
    return gates


def gates_of(model: nn.Module) -> list[DBCGate]:
    gates = [site.gate for site in gate_sites(model)]
    if any(g is None for g in gates):
        raise ValueError("this model has no gates attached (call attach_gates first)")
    return gates


def detach_gates(model: nn.Module) -> None:
    for site in gate_sites(model):
        site.gate = None


def freeze_gates(model: nn.Module) -> None:
    """Fix the masks: gate weights get no gradient (and hence no weight decay) from now on."""
    for gate in gates_of(model):
        gate.weight.requires_grad_(False)


def masks(model: nn.Module) -> list[torch.Tensor]:
    """Current binary masks (bool), one per searchable layer."""
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


def gated_macs(model: nn.Module, arch: Architecture | None = None) -> torch.Tensor:
    """MACs of the sub-network the gates select, through the one shared formula (differentiable)."""
    arch = arch or model.arch
    # float64: float32 is not exact above 2^24 MACs, and ImageNet networks have ~10^10.
    return arch.macs([g.kept().double() for g in gates_of(model)])


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
