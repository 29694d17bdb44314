"""Figures about a network that scripts and tables read: MACs, params, widths, channel groups."""
from __future__ import annotations

from pas.graph.network import Network


def arch_info(net: Network) -> dict:
    """Deploy MACs/params, the searched widths and every channel group of a network, as one dict."""
    macs = int(net.macs())
    head = sum(layer.in_channels * layer.out_channels for layer in net.graph.layers if layer.kind == "linear")
    searched = set(net.searched)
    groups = [{"index": g.index, "channels": g.size, "side": g.side, "producers": g.producers,
               "searched": g.index in searched, **({"fixed_by": g.reason} if not g.prunable else {}),
               **({"blocks": g.blocks} if g.blocks > 1 else {})}
              for g in net.graph.groups if g.producers != ["<input>"]]
    return {"backbone": net.backbone, "family": net.family, "macs": macs, "gmacs": round(macs / 1e9, 3),
            "conv_macs": macs - head, "params": int(net.params()), "widths": net.searchable_widths(),
            "layer_sizes": net.searchable_sizes(), "group_names": net.group_names(),
            "resolution": net.resolution, "num_classes": net.num_classes, "in_channels": net.in_channels,
            "groups": groups}


def network_info(name: str, *, resolution: int = 224, num_classes: int = 1000, in_channels: int = 3) -> dict:
    from pas.models import arch_for
    return {"name": name, **arch_info(arch_for(name, num_classes=num_classes, in_channels=in_channels,
                                                resolution=resolution))}
