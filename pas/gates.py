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
from pas.landing import group_floors

THRESHOLD = 0.5


def binary_mask(v: torch.Tensor, min_channels: int = 1) -> torch.Tensor:
    """1[v > 0.5] in the forward pass, the identity in the backward pass (straight-through).

    At least `min_channels` channels stay on (the group's floor): if fewer pass the threshold, the
    largest weights are kept, so a layer never falls below its floor.
    """
    hard = v.detach() > THRESHOLD
    k = min(min_channels, v.numel())
    if int(hard.sum()) < k:
        hard[torch.topk(v.detach(), k).indices] = True
    return hard.to(v.dtype) + (v - v.detach())


class DBCGate(nn.Module):
    """One channel group's gate. `importance` accumulates, over the search's training steps, the
    magnitude of the task loss's gradient on every channel's mask, |sum x dL/dy| (first-order Taylor
    importance, Molchanov et al. 2017) at the gate's sites: the estimated loss change of removing a
    kept channel or of bringing a removed one back. The penalty's gradient is not in it."""

    def __init__(self, channels: int, *, min_channels: int = 1, init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init)))
        self.register_buffer("importance", torch.zeros(channels))
        self.min_channels = min_channels

    def mask(self) -> torch.Tensor:
        return binary_mask(self.weight, self.min_channels)

    def kept(self) -> torch.Tensor:
        """Kept channel count, differentiable through the estimator."""
        return self.mask().sum()

    def observe(self, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self.importance += grad.detach().abs().to(self.importance.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask().view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.weight.numel()}, min_channels={self.min_channels}"


class GateSet(nn.ModuleList):
    """The gates of one model, the search's budget multiplier (a Lagrange multiplier learned by the
    `constraint` objective, `pas.search.BudgetConstraint`) and its step count; all travel with the
    training state, so a resumed search goes on where it stopped."""

    def __init__(self, gates):
        super().__init__(gates)
        self.register_buffer("multiplier", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))


GATES_ATTR = "pas_gates"  # the model attribute holding the gates: their names start with it


def network_of(model: nn.Module) -> Network:
    """The searchable view of `model` (set by `pas.models.build` or `pas.api.prepare`)."""
    net = getattr(model, "arch", None)
    if not isinstance(net, Network):
        raise PasError(f"{type(model).__name__} has no channel graph; build it with pas.models.build or pass "
                       f"it through pas.api.prepare(model, example_input)")
    return net


class _MaskSpec:
    """The mask of one gated module call's output: the gates of its channel segments (None: kept),
    carrying their gradient (`grad`) or forward-only (`pas.graph.channels.MaskPoint`)."""

    def __init__(self, parts, grad: bool = True):
        self.parts = parts  # [(DBCGate | None, channels)]
        self.grad = grad

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        pieces = []
        for g, n in self.parts:
            if g is None:
                pieces.append(torch.ones(n, device=like.device))
                continue
            piece = g.mask()
            if self.grad and piece.requires_grad and torch.is_grad_enabled():
                piece.register_hook(g.observe)
            pieces.append(piece)
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(like.dtype)


def _apply_mask(module, args, output):
    """The forward hook of a gated module: masks the output of the calls that have a mask."""
    calls = module._pas_calls
    k = calls[0] % calls[1]
    calls[0] += 1
    spec = module._pas_mask.get(k)
    if spec is None:
        return None
    m = spec.mask(output).view(1, -1, *([1] * (output.dim() - 2)))
    if spec.grad:
        return output * m
    return output + (output * (m - 1)).detach()  # the values masked, the gradient straight through


def _reset_calls(model, args):
    for module in model.__dict__.get("_pas_gated", ()):
        module._pas_calls[0] = 0


def _masked_norm_forward(self, x):
    """BN(x) * b computed as BN with gamma * b and beta * b: the same values and gradients (the
    mask's gradient comes out of BN's own reductions for gamma and beta), without another pass over
    the activations. The base class's forward runs unchanged (BatchNorm2d, SyncBatchNorm, ...)."""
    weight, bias = self._parameters["weight"], self._parameters["bias"]
    m = self._pas_norm_mask.mask(weight)
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


def attach_gates(model: nn.Module, *, min_channels: int = 1, floor: float | None = None) -> list[DBCGate]:
    """One fresh DBC gate (all channels on) per searched channel group, applied by forward hooks at
    the group's mask points (`pas.graph.channels.MaskPoint`: after the activation that follows each
    site, where a removed channel still hears the loss). A gate keeps at least its group's floor
    (`group_floors`)."""
    net = network_of(model)
    detach_gates(model)
    device = _device_of(model)
    floors = group_floors(net, min_channels, floor)
    gates = GateSet(DBCGate(g.size, min_channels=k) for g, k in zip(net.groups(), floors)).to(device)
    setattr(model, GATES_ATTR, gates)
    by_group = dict(zip(net.searched, gates))
    gated = []
    for point in net.graph.mask_points:
        parts = [(by_group.get(gi), n) for gi, n in net.graph.layout_groups(point.layout)]
        if all(g is None for g, _ in parts):
            continue
        site = model.get_submodule(point.module)
        spec = _MaskSpec(parts, grad=point.grad)
        if point.grad and point.calls == 1 and isinstance(site, nn.modules.batchnorm._BatchNorm) and site.affine:
            site._pas_norm_mask = spec
            site.__class__ = _masked_norm_class(type(site))
            continue
        if "_pas_hook" not in site.__dict__:
            site._pas_mask, site._pas_calls = {}, [0, point.calls]
            site._pas_hook = site.register_forward_hook(_apply_mask)
            gated.append(site)
        site._pas_mask[point.call] = spec
    model.__dict__["_pas_gated"] = gated
    model.__dict__["_pas_reset"] = model.register_forward_pre_hook(_reset_calls)
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
        for key in ("_pas_mask", "_pas_calls", "_pas_norm_mask"):
            m.__dict__.pop(key, None)
    if "_pas_reset" in model.__dict__:
        model.__dict__.pop("_pas_reset").remove()
    model.__dict__.pop("_pas_gated", None)
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
