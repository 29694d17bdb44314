"""A network's searchable widths and its cost, read from its channel graph.

`Network` is what the search, the baselines, compaction and the reports know about a network: the
channel groups that are searched (one DBC gate each), their full and current widths, and the MACs
and parameters of the deployed network as a function of the kept count of every group. The MACs
are the one formula of `pas.macs` applied to every traced conv and linear layer, so the number is
differentiable through the gates during the search and an exact integer for the reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from pas.errors import PasError
from pas.graph.channels import ChannelGraph, Group
from pas.macs import conv_macs, depthwise_macs, fc_macs, transposed_conv_macs

NETWORK_FORMAT = "pas-network/1"


@dataclass(frozen=True)
class Network:
    """The searchable view of one traced network at one input size.

    `backbone` names how to build it again (a registry name, `torchvision:NAME` or `module:function`);
    `widths` are the kept counts of the searched groups (full width unless given).
    """

    graph: ChannelGraph = field(repr=False, compare=False)
    searched: tuple[int, ...]  # indices into graph.groups, in graph order
    backbone: str
    family: str
    in_channels: int
    num_classes: int
    resolution: int
    widths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.widths is None:
            object.__setattr__(self, "widths", tuple(self.full_widths()))

    def __deepcopy__(self, memo):  # immutable: a copied model shares its network description
        return self

    # -- the searched groups --------------------------------------------------------------------
    def groups(self) -> list[Group]:
        return [self.graph.groups[i] for i in self.searched]

    def full_widths(self) -> list[int]:
        return [g.size for g in self.groups()]

    def searchable_widths(self) -> list[int]:
        return list(self.widths)

    def searchable_sizes(self) -> list[int]:
        """Feature-map side at which every searched group's channels are produced."""
        return [g.side for g in self.groups()]

    def group_names(self) -> list[str]:
        """A readable name per searched group: its first producer, '+N' for a shared trunk."""
        return [g.producers[0] + (f" (+{len(g.producers) - 1})" if len(g.producers) > 1 else "")
                for g in self.groups()]

    def blocks(self) -> list[int]:
        """Per searched group: the equal blocks whose kept counts must be equal (1 unless a grouped conv
        reads or writes it; see `pas.graph.channels`). Its width is a multiple of this number."""
        return [g.blocks for g in self.groups()]

    def block_masks(self, widths=None) -> list[torch.Tensor]:
        """Per searched group, the mask keeping its first width/blocks channels of every block (this
        network's widths unless given): the compact network of these widths (`pas.compact.compact`)."""
        widths = self.searchable_widths() if widths is None else widths
        return [block_mask(f, b, int(w)) for f, b, w in zip(self.full_widths(), self.blocks(), widths, strict=True)]

    def with_widths(self, widths: Sequence[int]) -> "Network":
        widths = tuple(int(w) for w in widths)
        full = self.full_widths()
        if len(widths) != len(full) or any(not 1 <= w <= f for w, f in zip(widths, full)):
            raise PasError(f"widths {list(widths)} do not fit {self.backbone}: expected {len(full)} widths, "
                           f"each between 1 and {full}")
        for w, b, name in zip(widths, self.blocks(), self.group_names()):
            if w % b:
                raise PasError(f"width {w} of {name} is not a multiple of {b}, the groups of the grouped convs "
                               f"that read or write it")
        return replace(self, widths=widths)

    # -- cost -------------------------------------------------------------------------------------
    def _kept(self, widths) -> Callable[[int], object]:
        widths = self.searchable_widths() if widths is None else list(widths)
        if len(widths) != len(self.searched):
            raise PasError(f"{len(widths)} widths given for {len(self.searched)} searched groups of {self.backbone}")
        by_group = dict(zip(self.searched, widths))
        g = self.graph

        def kept(layout):
            total = 0
            for s in layout:
                gi = g.space_group[s]
                total = total + (by_group[gi] if gi in by_group else g.space_size[s])
            return total
        return kept

    def macs(self, widths=None, *, input_grad: bool = True):
        """Deploy MACs (convs, transposed convs and linear layers, no bias) with these kept counts (ints or
        tensors) per searched group.

        A layer's cost is C_in * C_out * ...: with tensor widths, `input_grad=False` detaches its input
        width C_in, so that a group's gradient comes only from the layers whose output it is (the
        authors' code); a depth-wise conv's single width is its output's.
        """
        kept, total = self._kept(widths), 0
        inputs = kept if input_grad else lambda layout: _detached(kept(layout))
        for layer in self.graph.layers:
            h, w = layer.out_hw
            if layer.kind in ("conv", "grouped"):
                total = total + conv_macs(inputs(layer.in_layout), kept(layer.out_layout), layer.kernel, h, w,
                                          layer.groups)
            elif layer.kind == "transposed":
                total = total + transposed_conv_macs(inputs(layer.in_layout), kept(layer.out_layout), layer.kernel,
                                                     *layer.in_hw)
            elif layer.kind == "depthwise":
                total = total + depthwise_macs(kept(layer.out_layout), layer.kernel, h, w)
            elif layer.kind == "linear":
                total = total + fc_macs(inputs(layer.in_layout) * layer.factor, kept(layer.out_layout))
        return total

    def params(self, widths=None) -> int:
        """Parameters of the deployed network: conv/linear weights and biases (a BN right after a conv
        is folded into it: the conv gains a bias), the affine parameters of any other norm."""
        kept, total = self._kept(widths), 0
        for layer in self.graph.layers:
            out = kept(layer.out_layout)
            taps = layer.kernel[0] * layer.kernel[1]
            if layer.kind in ("conv", "grouped", "transposed"):  # a transposed conv has groups 1
                total += kept(layer.in_layout) // layer.groups * out * taps
            elif layer.kind == "depthwise":
                total += out * taps
            elif layer.kind == "linear":
                total += kept(layer.in_layout) * layer.factor * out
            elif layer.kind == "norm":
                total += 0 if layer.folded or not layer.bias else 2 * out
                continue
            if layer.bias or layer.bn:
                total += out
        return int(total)

    def gated_macs(self, kept_counts: Sequence[torch.Tensor], *, input_grad: bool = True) -> torch.Tensor:
        """MACs with differentiable kept counts (float64: float32 is not exact above 2^24)."""
        return self.macs([k.double() for k in kept_counts], input_grad=input_grad)

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": NETWORK_FORMAT, "backbone": self.backbone, "family": self.family,
                "in_channels": self.in_channels, "num_classes": self.num_classes, "resolution": self.resolution,
                "widths": self.searchable_widths(), "full_widths": self.full_widths(),
                "groups": self.group_names()}


def _detached(width):
    return width.detach() if isinstance(width, torch.Tensor) else width


def block_mask(size: int, blocks: int, width: int) -> torch.Tensor:
    """The first width/blocks channels of each of `blocks` equal blocks of `size` channels (a
    grouped conv's layout of `width` channels)."""
    mask = torch.zeros(blocks, size // blocks, dtype=torch.bool)
    mask[:, :width // blocks] = True
    return mask.flatten()


def searched_groups(graph: ChannelGraph, policy: Callable[[Group], bool] | None = None) -> tuple[int, ...]:
    """The prunable groups that get a gate: all of them, or those a family's policy picks."""
    return tuple(g.index for g in graph.prunable() if policy is None or policy(g))


def describe(model, example_input, *, backbone: str | None = None) -> Network:
    """Trace any module on an example input (a tensor batch, or one image's shape (C, H, W)), attach
    its Network as `model.arch` and return it: the entry point for a user's own network."""
    from pas.graph.channels import channel_graph
    shape = tuple(example_input.shape[1:]) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise PasError(f"example input of shape {shape} per image: expected (channels, side, side)")
    graph = channel_graph(model, shape)
    outputs = [g.size for g in graph.groups if not g.prunable and g.reason == "the network output"]
    policy = getattr(model, "pas_searchable", None)
    net = Network(graph, searched_groups(graph, policy), backbone=backbone or type(model).__name__,
                  family="custom", in_channels=shape[0], num_classes=outputs[-1] if outputs else 0,
                  resolution=shape[1])
    model.arch = net
    return net
