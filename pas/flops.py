"""An independent MACs count by ptflops (aten backend: it sees only conv and matmul ops)."""
from __future__ import annotations

import copy

from torch import nn

from pas.errors import PasError


def ptflops_macs(model: nn.Module, in_channels: int, resolution: int) -> int:
    """ptflops' count for one image, in our convention (conv and FC multiply-accumulates only).

    ptflops' aten backend adds one MAC per output element of a layer with a bias; our convention
    counts none, so the biases are dropped from a copy before counting. Channel masks are invisible
    to ptflops: count the physically compacted, fused network. A transposed conv it counts as
    prod(weight shape) * H_in * W_in (ptflops.aten_ops.conv_flop_count), our `transposed_conv_macs`.
    """
    from ptflops import get_model_complexity_info
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
            m.bias = None
    macs, _ = get_model_complexity_info(model, (in_channels, resolution, resolution), backend="aten",
                                        as_strings=False, print_per_layer_stat=False, verbose=False)
    if macs is None:  # ptflops reports failure by returning None instead of raising
        raise PasError("ptflops could not count this model")
    return int(macs)
