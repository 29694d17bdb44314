"""Building blocks shared by the backbones: conv+BN(+act) in training form, conv+bias(+act) deployed.

A module that produces searchable channels is a gate site: its `gate` (None until
`pas.gates.attach_gates`) multiplies its activated output channel-wise. Fusing keeps the gate, so a
masked network stays masked after reparameterization.
"""
from __future__ import annotations

from torch import nn

from pas.reparam import fold_bn, fused_conv

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, None: nn.Identity}


class GateSite(nn.Module):
    """Mixin: an optional channel gate applied to the module's (activated) output."""

    gate: nn.Module | None

    def _init_gate(self, channels: int) -> None:
        self.gate = None
        self.gate_channels = channels

    def _gated(self, x):
        return x if self.gate is None else self.gate(x)


class ConvAct(GateSite):
    """Deploy form: conv with bias, then activation, then the optional gate."""

    def __init__(self, conv: nn.Conv2d, act: str | None, gate: nn.Module | None = None):
        super().__init__()
        self.conv = conv
        self.act_name = act
        self.act = ACTIVATIONS[act](inplace=True) if act else nn.Identity()
        self._init_gate(conv.out_channels)
        self.gate = gate

    def forward(self, x):
        return self._gated(self.act(self.conv(x)))


class ConvBNAct(GateSite):
    """Training form: conv (no bias) + BN + activation (+ gate); fuses into ConvAct."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1,
                 act: str | None = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act_name = act
        self.act = ACTIVATIONS[act](inplace=True) if act else nn.Identity()
        self._init_gate(c_out)

    def forward(self, x):
        return self._gated(self.act(self.bn(self.conv(x))))

    def fuse(self) -> ConvAct:
        weight, bias = fold_bn(self.conv.weight, None, self.bn)
        return ConvAct(fused_conv(self.conv, weight, bias), self.act_name, self.gate)
