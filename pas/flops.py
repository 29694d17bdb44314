"""An independent MACs count by ptflops (aten backend: conv and matmul only, our convention)."""
from __future__ import annotations

from torch import nn

from pas.errors import PasError


def ptflops_macs(model: nn.Module, in_channels: int, resolution: int) -> int:
    """ptflops' count of one image. Only a physically compact, fused network is counted right:
    channel masks are invisible to it."""
    from ptflops import get_model_complexity_info
    was_training = model.training
    macs, _ = get_model_complexity_info(model, (in_channels, resolution, resolution), backend="aten",
                                        as_strings=False, print_per_layer_stat=False, verbose=False)
    model.train(was_training)
    if macs is None:  # ptflops reports failure by returning None instead of raising
        raise PasError("ptflops could not count this model")
    return int(macs)
