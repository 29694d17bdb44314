"""The one MACs formula of the project.

Convention: multiply-accumulates of convolutions (plain and transposed) and the fully connected
classifier only; BN, ReLU, bias and pooling are not counted. A RepVGG "FLOPs" figure is this number
(B1: 11.81 G at 224x224).

Every function takes widths that may be Python ints or 0-d tensors, so the same formula gives the
integer count for reports and ptflops cross-checks and a differentiable count for the search loss.
"""
from __future__ import annotations


def conv_out_size(size: int, stride: int) -> int:
    """Output side of a 3x3/pad-1 or a 1x1/pad-0 convolution with this stride."""
    return (size - 1) // stride + 1


def _taps(kernel) -> int:
    """k*k for a square kernel size k, kh*kw for a (kh, kw) pair."""
    return kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]


def conv_macs(c_in, c_out, kernel, h_out: int, w_out: int, groups: int = 1):
    """Dense or grouped convolution: C_in * C_out * k^2 * H_out * W_out / groups."""
    macs = c_in * c_out * (_taps(kernel) * h_out * w_out)
    if groups == 1:
        return macs
    # Integer widths give an exact integer (C_in and C_out are multiples of groups).
    return macs // groups if isinstance(macs, int) else macs / groups


def transposed_conv_macs(c_in, c_out, kernel, h_in: int, w_in: int):
    """Transposed convolution (groups 1): C_in * C_out * k^2 * H_in * W_in. Every input pixel scatters a
    k x k patch into every output channel, so the count follows the input's side, not the output's
    (ptflops' aten backend counts the same)."""
    return c_in * c_out * (_taps(kernel) * h_in * w_in)


def depthwise_macs(channels, kernel, h_out: int, w_out: int):
    """Depth-wise convolution (groups == channels): C * k^2 * H_out * W_out."""
    return channels * (_taps(kernel) * h_out * w_out)


def fc_macs(in_features, out_features):
    """Fully connected layer: in * out."""
    return in_features * out_features
