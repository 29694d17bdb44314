"""Figures about a network that scripts and tables read: MACs, params, widths."""
from __future__ import annotations

from pas.arch import Architecture, RepVGGArch
from pas.macs import fc_macs


def arch_info(arch: Architecture) -> dict:
    """Deploy MACs/params and the per-layer widths of an architecture, as one JSON-able dict."""
    macs = int(arch.macs())
    head = fc_macs(arch.widths[-1] if isinstance(arch, RepVGGArch) else arch.last_width, arch.num_classes)
    info = {"family": arch.family, "macs": macs, "gmacs": round(macs / 1e9, 3),
            "conv_macs": macs - head, "params": int(arch.params()),
            "widths": arch.searchable_widths(), "resolution": arch.resolution,
            "num_classes": arch.num_classes, "in_channels": arch.in_channels}
    if isinstance(arch, RepVGGArch):
        info.update(strides=list(arch.strides), groups=list(arch.groups))
    else:
        info.update(strides=[b.stride for b in arch.blocks])
    return info


def network_info(name: str, *, resolution: int = 224, num_classes: int = 1000, in_channels: int = 3) -> dict:
    from pas.models import arch_for
    arch = arch_for(name, num_classes=num_classes, in_channels=in_channels, resolution=resolution)
    return {"name": name, **arch_info(arch)}
