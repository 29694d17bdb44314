"""Building blocks shared by the backbones: conv+BN(+act) in training form, conv+bias(+act) deployed."""
from __future__ import annotations

from torch import nn

from pas.reparam import fold_bn, fused_conv

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, None: nn.Identity}


class ConvAct(nn.Module):
    """Deploy form: conv with bias, then activation."""

    def __init__(self, conv: nn.Conv2d, act: str | None):
        super().__init__()
        self.conv = conv
        self.act_name = act
        self.act = ACTIVATIONS[act](inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.conv(x))


class ConvBNAct(nn.Module):
    """Training form: conv (no bias) + BN + activation; fuses into ConvAct."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1,
                 act: str | None = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act_name = act
        self.act = ACTIVATIONS[act](inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def output_bns(self) -> list[nn.BatchNorm2d]:
        return [self.bn]

    def fuse(self) -> ConvAct:
        weight, bias = fold_bn(self.conv.weight, None, self.bn)
        return ConvAct(fused_conv(self.conv, weight, bias), self.act_name)
