"""Channel groups of any traceable CNN: which channels must be kept or removed together.

torch.fx traces the network (on the meta device: no arithmetic). Every dense conv, transposed conv
or linear layer opens a channel *space* for its output; ops that combine tensors element-wise (add,
mul) tie the spaces of their inputs together; depth-wise convs, BN, instance norm, activations,
pooling, padding and dropout pass their input's channels through; `torch.cat` along channels
concatenates. A *group* is a set of tied spaces (union-find): the residual trunk of a ResNet stage is
one group, every layer of a fused RepVGG is its own.

A transposed conv (a decoder's upsampling, e.g. CycleGAN's generator) is a dense layer like a conv,
its gate after the norm that follows it; only its weight is laid out (C_in, C_out, k, k), so output
channel o is column o (compaction, the BN fold and the l1 baseline read it so). Grouped transposed
convs are refused.

A grouped conv (groups g, not depth-wise) reads its input in g equal contiguous blocks and writes its
output in g: output block i sees input block i only. It can lose channels and stay a grouped conv with
g groups if every block keeps the same number of channels (which ones may differ from block to
block: each output row keeps the columns of its own block). The spaces it reads and writes record
that constraint as `blocks` (the lcm over every grouped conv touching them, so that each conv's blocks
are unions of whole blocks); a space read in a concatenation by a grouped conv, or one whose blocks
are single channels, keeps its width.

Modules that fuse themselves (`fuse()`, e.g. a RepVGG training block) are read in their fused form,
one conv: a branch that fuses away (RepVGG's identity) ties nothing, which is exactly the freedom
PaS exploits. A group is prunable unless it touches the network's input or output, a norm that mixes
channels, or a grouped conv in a way that leaves it no freedom (above).

The tracer refuses what it cannot reason about (an op with unknown channel semantics, a parameter
used directly in forward, data-dependent control flow) with a one-line error naming the module and
the op, instead of a wrong count.
"""
from __future__ import annotations

import copy
import math
import operator
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pas.errors import PasError

# Modules and functions that keep every channel where it is (x -> f(x) channel-wise).
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.GELU, nn.Tanh,
                 nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU, nn.Dropout, nn.Dropout2d, nn.Identity,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Upsample,
                 nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d, nn.ConstantPad2d)
_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm, nn.InstanceNorm2d)
_F = nn.functional
_PASS_FUNCTIONS = {_F.relu, _F.relu6, _F.hardswish, _F.hardsigmoid, _F.silu, _F.gelu, _F.sigmoid, _F.tanh,
                   _F.leaky_relu, _F.elu, _F.mish, _F.dropout, _F.dropout2d, _F.adaptive_avg_pool2d,
                   _F.adaptive_max_pool2d, _F.avg_pool2d, _F.max_pool2d, _F.interpolate, torch.relu,
                   torch.sigmoid, torch.tanh, torch.nn.functional.pad, torch.clone}
# Activations a conv may end in (the latency table times conv + activation, as deployed).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.GELU, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish)
_ACTIVATION_FUNCTIONS = {_F.relu: "ReLU", torch.relu: "ReLU", _F.relu6: "ReLU6", _F.silu: "SiLU",
                         _F.hardswish: "Hardswish", _F.hardsigmoid: "Hardsigmoid", _F.sigmoid: "Sigmoid",
                         torch.sigmoid: "Sigmoid", _F.gelu: "GELU", _F.tanh: "Tanh", torch.tanh: "Tanh",
                         _F.leaky_relu: "LeakyReLU", _F.elu: "ELU", _F.mish: "Mish"}
_ACTIVATION_METHODS = {"relu": "ReLU", "relu_": "ReLU", "sigmoid": "Sigmoid", "sigmoid_": "Sigmoid",
                       "tanh": "Tanh"}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float", "half",
                 "to", "type_as", "detach"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_NON_TENSOR_METHODS = {"size", "dim"}


def _pass_functions() -> set:
    """_PASS_FUNCTIONS, plus torchvision's stochastic depth (an fx-wrapped function, identity at eval
    time) when torchvision's ops are loaded: a network that calls it has imported them, and importing
    them for every other network would cost seconds per process (torch._dynamo)."""
    ops = sys.modules.get("torchvision.ops")
    return _PASS_FUNCTIONS | {ops.stochastic_depth} if ops is not None else _PASS_FUNCTIONS


@dataclass
class Layer:
    """A conv, linear or norm layer as the cost model and the compaction see it.

    `in_layout` and `out_layout` list the channel spaces of the input and the output (a cat makes
    several); a depth-wise conv has out_layout == in_layout. `factor`: input features per channel
    of a linear layer after a flatten (H*W).
    """
    module: str
    kind: str  # "conv", "depthwise", "grouped", "transposed", "linear", "norm"
    in_layout: tuple[int, ...]
    out_layout: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    factor: int = 1
    in_channels: int = 0
    out_channels: int = 0
    bn: str | None = None  # conv: the BN right after it, which deployment folds into it
    folded: bool = False  # norm: folded into the conv before it when deployed
    # conv geometry, as the latency table rebuilds the layer: input side, stride, padding, dilation,
    # and a transposed conv's extra output rows and columns (its output side is not set by the rest)
    in_hw: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    output_padding: tuple[int, int] = (0, 0)
    act: str | None = None  # the torch.nn activation class applied right after it (its BN), if any


@dataclass
class Group:
    """Tied channel spaces: they are kept or removed together, channel by channel."""
    index: int
    size: int
    spaces: list[int]
    producers: list[str]  # modules whose outputs open the group's spaces, in graph order
    sites: list[str]  # per producer: where its output is masked (the BN after a conv, or itself)
    side: int  # feature-map side of the first producer's output (1 after global pooling)
    prunable: bool
    reason: str = ""  # why a group is not prunable
    blocks: int = 1  # equal contiguous blocks that must keep equal counts (grouped convs read/write them)


@dataclass
class MaskPoint:
    """Where a gate multiplies prunable channels: the output of the `call`-th of `calls` calls of
    `module` in one forward pass.

    A mask point starts at a *site* (the BN after a conv, a fused block, a depth-wise conv's BN, a
    norm that is not folded) and moves forward along the site's only use, through a residual add of
    the same channels, to the output of the activation that follows (`after_activation`): there a
    removed channel still has its real activation x, so its gate hears the loss (dL/db = sum x dL/dy),
    where before a ReLU relu'(0) = 0 would silence it. Masking later on a path that nothing else reads
    changes no kept value, so the masked network still equals the compact one.

    `grad`: the point's site opens the channels (a dense conv, a fused block, a linear layer): its
    mask carries the gate's gradient. A point whose site only passes channels that a mask upstream
    has already zeroed (a depth-wise conv, a norm on a concatenation) masks forward-only: the values
    are zeroed but the gradient passes straight through, so it never cuts the gradient path of the
    gate upstream (its own input is zero: it would have no gradient of its own to give).
    """
    module: str
    layout: tuple[int, ...]
    call: int = 0
    calls: int = 1
    grad: bool = True
    after_activation: bool = False
    site: str = ""


@dataclass
class ChannelGraph:
    layers: list[Layer]
    groups: list[Group]
    space_group: dict[int, int]  # space id -> group index
    space_size: dict[int, int]
    mask_points: list[MaskPoint]
    in_channels: int
    input_shape: tuple[int, ...] = field(default_factory=tuple)

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def layout_groups(self, layout) -> list[tuple[int, int]]:
        """[(group index, channels)] of a layout."""
        return [(self.space_group[s], self.space_size[s]) for s in layout]


class _Tracer(fx.Tracer):
    """torch.nn layers and every module that fuses itself are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return callable(getattr(m, "fuse", None)) or super().is_leaf_module(m, qualname)


def _where(node: fx.Node, root: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        if path:
            return f"in module {path} ({getattr(cls, '__name__', cls)})"
    return f"in module <root> ({root})"


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"method .{t}()"
    return f"function {getattr(t, '__module__', '') + '.' if getattr(t, '__module__', '') else ''}{getattr(t, '__name__', t)}"


def trace(model: nn.Module) -> fx.GraphModule:
    """The fx graph of `model`; a one-line error for what symbolic tracing cannot follow."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise PasError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {msg}); "
                       f"expected a network without data-dependent control flow") from None
    return fx.GraphModule(model, graph)


def _fused_view(module: nn.Module) -> tuple[nn.Module, str | None]:
    """The conv a fusable leaf becomes, and the activation it ends in (read on a copy, the model is
    untouched)."""
    fused = copy.deepcopy(module).eval().fuse()
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != 1:
        raise PasError(f"{type(module).__name__}.fuse() gives {len(convs)} convs; expected exactly one")
    acts = [type(m).__name__ for m in fused.modules() if isinstance(m, _ACTIVATIONS)]
    return convs[0], acts[-1] if acts else None


class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.root = type(gm).__name__ if not hasattr(gm, "_pas_root") else gm._pas_root
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.producer: dict[int, str] = {}
        self.side: dict[int, int] = {}
        self.fixed: dict[int, str] = {}
        self.layout: dict[fx.Node, tuple[int, ...]] = {}
        self.factor: dict[fx.Node, int] = {}
        self.layers: list[Layer] = []
        self.sites: dict[str, tuple[int, ...]] = {}
        # how often each module is called: a gate site must be called once
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.site_of: dict[int, str] = {}
        self.layer_of: dict[fx.Node, Layer] = {}
        self.blocks: dict[int, tuple[int, str]] = {}  # space -> (blocks, the grouped conv that set them last)
        self.site_role: dict[str, bool] = {}  # site -> opens its channels (True) or passes masked ones
        self.ends_in_act: set[str] = set()  # fused leaves whose output is after their activation
        self.call_index: dict[fx.Node, int] = {}  # a module call's place among that module's calls
        self.first_call: dict[str, fx.Node] = {}
        seen: Counter = Counter()
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.call_index[n] = seen[n.target]
                seen[n.target] += 1
                self.first_call.setdefault(n.target, n)


    def where(self, node: fx.Node) -> str:
        return _where(node, self.root)

    # -- union-find over spaces ---------------------------------------------------------------
    def new_space(self, size: int, producer: str, side: int) -> int:
        s = len(self.size)
        self.parent[s], self.size[s], self.producer[s], self.side[s] = s, size, producer, side
        return s

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def tie(self, a: tuple[int, ...], b: tuple[int, ...], node: fx.Node) -> None:
        sa, sb = [self.size[s] for s in a], [self.size[s] for s in b]
        if sa != sb:
            if sum(sa) == sum(sb):  # e.g. cat([x, y]) + z: tie channel by channel is not expressible
                for s in a + b:
                    self.fixed.setdefault(s, f"channels tied across unequal segments {self.where(node)}")
                return
            raise PasError(f"{_op_name(node)} {self.where(node)} combines {sum(sa)} and {sum(sb)} channels; "
                           f"expected equal channel counts")
        for x, y in zip(a, b):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    # -- nodes ----------------------------------------------------------------------------------
    @staticmethod
    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        out = []
        for a in _flat(node.args, node.kwargs):
            if isinstance(a, fx.Node) and a in self.layout:
                out.append(a)
            elif isinstance(a, fx.Node) and a.op == "get_attr":
                raise PasError(f"{_op_name(node)} {self.where(node)} uses the tensor {a.target!r} directly; the "
                               f"tracer cannot tell which of its entries belong to which channel")
        return out

    def run(self, in_channels: int) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = self.shape(node)
                s = self.new_space(in_channels, "<input>", shape[-1] if shape else 0)
                self.fixed[s] = "the network input"
                self.layout[node] = (s,)
            elif node.op == "get_attr":
                continue
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call_function(node)
            elif node.op == "output":
                for a in _flat(node.args, {}):
                    if isinstance(a, fx.Node) and a in self.layout:
                        for s in self.layout[a]:
                            self.fixed[s] = "the network output"

    def out_side(self, node) -> int:
        shape = self.shape(node)
        return shape[-1] if shape and len(shape) == 4 else 1

    def call_module(self, node: fx.Node) -> None:
        name = node.target
        module = self.modules[name]
        args = [a for a in _flat(node.args, node.kwargs) if isinstance(a, fx.Node) and a in self.layout]
        if callable(getattr(module, "fuse", None)):
            conv, act = _fused_view(module)
            if act is not None:
                self.ends_in_act.add(name)
            self.conv(node, name, conv, args, site=name, act=act)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            self.conv(node, name, module, args, site=self.site_after(node, name))
        elif isinstance(module, nn.Linear):
            self.linear(node, name, module, args)
        elif isinstance(module, _NORMS):
            lay = self.layout[args[0]]
            self.layout[node] = lay
            before = self.layer_of.get(args[0])
            folded = before is not None and before.bn == name
            # every norm, with parameters or not: compaction gives each its kept channel count
            # (an instance norm without affine parameters warns on any other count)
            self.layers.append(Layer(name, "norm", lay, lay, in_channels=module.num_features,
                                     out_channels=module.num_features, folded=folded,
                                     bias=getattr(module, "weight", None) is not None))
            if not folded:  # a norm on a sum or a concatenation (DenseNet's pre-activation) turns a
                self.sites.setdefault(name, lay)  # masked zero into its shift: mask after it too
                self.site_role.setdefault(name, False)
        elif isinstance(module, nn.GroupNorm):
            lay = self.layout[args[0]]
            for s in lay:
                self.fixed[s] = f"GroupNorm {name} mixes channels within its groups"
            self.layout[node] = lay
            if module.weight is not None:
                self.layers.append(Layer(name, "norm", lay, lay, in_channels=module.num_channels,
                                         out_channels=module.num_channels))
        elif isinstance(module, nn.Flatten):
            self.flatten(node, args[0], module.start_dim)
        elif isinstance(module, _PASS_MODULES):
            if isinstance(module, nn.PReLU) and module.num_parameters > 1:
                raise PasError(f"module {name} (PReLU with {module.num_parameters} slopes) has per-channel "
                               f"parameters the tracer does not slice; expected one slope")
            self.layout[node] = self.layout[args[0]]
            self.factor[node] = self.factor.get(args[0], 1)
        else:
            raise PasError(f"module {name} ({type(module).__name__}) has no known channel semantics; the "
                           f"tracer handles convs, linear layers, norms, activations, pooling and dropout")

    def site_after(self, node: fx.Node, name: str) -> str:
        """Where a gate masks a conv's output: after the BN that follows it, if one does (a masked
        channel must be zero after the affine BN too), else right after the conv."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and \
                isinstance(self.modules[users[0].target], _NORMS):
            return users[0].target
        return name

    def activation_after(self, node: fx.Node, site: str) -> str | None:
        """The activation applied to a conv's output (after its BN), when it is the output's only use."""
        if site != node.target:
            users = list(node.users)
            node = users[0] if len(users) == 1 and users[0].target == site else node
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_module" and isinstance(self.modules[user.target], _ACTIVATIONS):
            return type(self.modules[user.target]).__name__
        if user.op == "call_function":
            return _ACTIVATION_FUNCTIONS.get(user.target)
        return _ACTIVATION_METHODS.get(user.target) if user.op == "call_method" else None

    def conv(self, node, name, conv: nn.Conv2d | nn.ConvTranspose2d, args, site: str,
             act: str | None = None) -> None:
        lay = self.layout[args[0]]
        c_in, c_out, g = conv.in_channels, conv.out_channels, conv.groups
        transposed = isinstance(conv, nn.ConvTranspose2d)
        if transposed and g > 1:
            raise PasError(f"module {name} (ConvTranspose2d with groups={g}): grouped transposed convs are not "
                           f"supported; expected groups=1")
        shape, in_shape = self.shape(node), self.shape(args[0])
        hw = (shape[2], shape[3])
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        common = dict(kernel=tuple(conv.kernel_size), out_hw=hw, groups=g, bias=conv.bias is not None,
                      in_channels=c_in, out_channels=c_out, in_hw=(in_shape[2], in_shape[3]),
                      stride=tuple(conv.stride), padding=padding, dilation=tuple(conv.dilation),
                      output_padding=tuple(conv.output_padding),
                      act=act if act is not None else self.activation_after(node, site))
        if g == 1:
            out = (self.new_space(c_out, name, hw[1]),)
            kind = "transposed" if transposed else "conv"
        elif g == c_in == c_out:
            out, kind = lay, "depthwise"
        else:
            out = (self.new_space(c_out, name, hw[1]),)
            kind = "grouped"
            self.split_in_blocks(out, g, name)
            if len(lay) == 1:
                self.split_in_blocks(lay, g, name)
            else:  # its blocks would straddle the concatenated spaces
                for s in lay:
                    self.fixed[s] = f"grouped conv {name} (groups={g}) reads a concatenation"
        bn = site if site != name and isinstance(self.modules[site], (nn.BatchNorm2d, nn.SyncBatchNorm)) \
            and self.calls[site] == 1 else None
        layer = Layer(name, kind, lay, out, bn=bn, **common)
        self.layers.append(layer)
        self.layer_of[node] = layer
        self.layout[node] = out
        self.sites.setdefault(site, out)
        self.site_role.setdefault(site, kind != "depthwise")
        if kind != "depthwise":
            self.site_of[out[0]] = site

    def split_in_blocks(self, layout: tuple[int, ...], groups: int, conv: str) -> None:
        for s in layout:
            blocks = math.lcm(self.blocks.get(s, (1, ""))[0], groups)
            self.blocks[s] = (blocks, f"grouped conv {conv} (groups={groups})")

    def linear(self, node, name, linear: nn.Linear, args) -> None:
        src = args[0]
        shape = self.shape(src)
        if shape is None or len(shape) != 2:
            raise PasError(f"module {name} (Linear) gets a {len(shape) if shape else '?'}-d input; the tracer "
                           f"handles linear layers on flattened (N, features) inputs")
        lay, factor = self.layout[src], self.factor.get(src, 1)
        out = (self.new_space(linear.out_features, name, 1),)
        self.layers.append(Layer(name, "linear", lay, out, bias=linear.bias is not None, factor=factor,
                                 in_channels=linear.in_features, out_channels=linear.out_features,
                                 act=self.activation_after(node, name)))
        self.layout[node] = out
        self.sites.setdefault(name, out)
        self.site_role.setdefault(name, True)

    def flatten(self, node, src, start_dim: int) -> None:
        shape = self.shape(src)
        if start_dim != 1 or shape is None:
            raise PasError(f"flatten from dim {start_dim} {self.where(node)}: the tracer handles flattening "
                           f"(N, C, H, W) from dim 1")
        self.layout[node] = self.layout[src]
        self.factor[node] = math.prod(shape[2:]) if len(shape) > 2 else self.factor.get(src, 1)

    def call_function(self, node: fx.Node) -> None:
        t = node.target
        tensors = self.tensor_args(node)
        if not tensors:
            return  # shapes, sizes, constants
        out_shape = self.shape(node)
        if node.op == "call_method" and t in _NON_TENSOR_METHODS:
            return
        if t is operator.getitem or (out_shape is None and node.op == "call_function"):
            if t is operator.getitem and self.shape(node) is not None:
                raise PasError(f"indexing a tensor {self.where(node)} selects channels the tracer cannot follow")
            return
        src = tensors[0]
        if t in _pass_functions() or (node.op == "call_method" and t in _PASS_METHODS):
            self.layout[node], self.factor[node] = self.layout[src], self.factor.get(src, 1)
        elif t in _ELEMENTWISE or (node.op == "call_method" and t in _ELEMENTWISE_METHODS):
            channels = out_shape[1] if out_shape and len(out_shape) >= 2 else None
            wide = [a for a in tensors if (self.shape(a) or (0, 0))[1:2] == (channels,)] or tensors[:1]
            for a in wide[1:]:
                self.tie(self.layout[wide[0]], self.layout[a], node)
            self.layout[node], self.factor[node] = self.layout[wide[0]], self.factor.get(wide[0], 1)
        elif t is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim < 0:
                dim += len(self.shape(src) or ())
            if dim == 1:
                self.layout[node] = tuple(s for a in tensors for s in self.layout[a])
            else:
                for a in tensors[1:]:
                    self.tie(self.layout[tensors[0]], self.layout[a], node)
                self.layout[node] = self.layout[tensors[0]]
        elif t is torch.flatten or (node.op == "call_method" and t == "flatten"):
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            self.flatten(node, src, start)
        elif node.op == "call_method" and t in ("view", "reshape") or t is torch.reshape:
            in_shape = self.shape(src)
            if out_shape and in_shape and len(out_shape) == 2 and out_shape[0] == in_shape[0] \
                    and out_shape[1] == math.prod(in_shape[1:]):
                self.flatten(node, src, 1)
            else:
                raise PasError(f"{_op_name(node)} {self.where(node)} reshapes {in_shape} to {out_shape}, which "
                               f"moves channels; the tracer only follows a flatten to (N, C*H*W)")
        elif (t is torch.mean or (node.op == "call_method" and t == "mean")) and out_shape is not None \
                and len(out_shape) >= 2 and out_shape[1] == (self.shape(src) or (0, 0))[1]:
            self.layout[node] = self.layout[src]
        else:
            raise PasError(f"{_op_name(node)} {self.where(node)} has no known channel semantics; the tracer "
                           f"handles element-wise arithmetic, cat, flatten, activations and pooling")

    # -- where the gates go -----------------------------------------------------------------------
    def _groups_of(self, node: fx.Node) -> tuple[int, ...] | None:
        lay = self.layout.get(node)
        return None if lay is None else tuple(self.find(s) for s in lay)

    def _is_activation(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], _ACTIVATIONS)
        if node.op == "call_function":
            return node.target in _ACTIVATION_FUNCTIONS
        return node.op == "call_method" and node.target in _ACTIVATION_METHODS

    def _is_residual_add(self, node: fx.Node, source: fx.Node) -> bool:
        """An add of tensors that carry the same channel groups as `source` (a residual sum)."""
        is_add = node.target in (operator.add, operator.iadd, torch.add) if node.op == "call_function" else \
            node.op == "call_method" and node.target in ("add", "add_")
        if not is_add:
            return False
        tensors = [a for a in _flat(node.args, node.kwargs) if isinstance(a, fx.Node) and a in self.layout]
        want = self._groups_of(source)
        return len(tensors) >= 2 and all(self._groups_of(a) == want for a in tensors) and \
            self.shape(node) == self.shape(source)

    def _is_channelwise(self, node: fx.Node) -> bool:
        """An op whose output channel c depends on its input channel c alone, laid out alike: masking
        after it instead of before it changes no kept value."""
        if self._is_activation(node):
            return True
        if node.op == "call_module":
            module = self.modules[node.target]
            if callable(getattr(module, "fuse", None)) or isinstance(module, nn.Conv2d):
                layer = self.layer_of.get(node)
                return layer is not None and layer.kind == "depthwise"
            return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d, nn.Dropout,
                                       nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d))
        return node.op == "call_function" and node.target in (_F.dropout, _F.dropout2d, _F.max_pool2d,
                                                               _F.avg_pool2d, torch.clone)

    def gate_position(self, site: str) -> tuple[fx.Node, bool]:
        """The module call whose output a site's mask multiplies, and whether it is after an activation
        (see `MaskPoint`): forward along the only use through channel-wise ops (activations, norms,
        depth-wise convs, pooling) and residual adds of the same channels, up to the last module call
        before the channels reach a dense layer, a concatenation or a second reader."""
        node = self.first_call[site]
        state = site in self.ends_in_act  # whether the current value is an activation's output
        best, after = node, state
        current = node
        while True:
            users = list(current.users)
            if len(users) != 1:
                break
            user = users[0]
            if not (self._is_channelwise(user) or self._is_residual_add(user, current)):
                break
            if self._is_activation(user) or user.target in self.ends_in_act:
                state = True
            elif not (user.op == "call_module" and isinstance(self.modules[user.target], (
                    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d))):
                state = False
            if user.op == "call_module":
                best, after = user, state
            current = user
        return best, after

    def mask_points(self, prunable: set[int], space_group: dict[int, int]) -> list[MaskPoint]:
        points: dict[tuple[str, int], MaskPoint] = {}
        for site, lay in self.sites.items():
            if not any(space_group[s] in prunable for s in lay):
                continue
            node, after = self.gate_position(site)
            key = (node.target, self.call_index[node])
            grad = self.site_role.get(site, True)
            if key in points:  # two sites end at one activation (a residual add's two branches)
                point = points[key]
                if [space_group[s] for s in point.layout] != [space_group[s] for s in lay]:
                    raise PasError(f"module {node.target} carries two channel layouts {self.where(node)}; "
                                   f"expected one")
                point.grad = point.grad or grad
                continue
            points[key] = MaskPoint(node.target, lay, call=key[1], calls=self.calls[node.target], grad=grad,
                                    after_activation=after, site=site)
        return list(points.values())

    # -- result ---------------------------------------------------------------------------------
    def set_blocks(self, group: Group) -> None:
        """The group's blocks: the lcm over its spaces. Blocks of one channel leave it no width but its full one."""
        for s in group.spaces:
            if s in self.blocks:
                group.blocks = math.lcm(group.blocks, self.blocks[s][0])
                if group.blocks == group.size and group.prunable:
                    group.prunable, group.reason = False, f"{self.blocks[s][1]} has one channel per group"

    def result(self, in_channels: int, input_shape) -> ChannelGraph:
        for name, n in self.calls.items():
            if n > 1 and name in self.sites:
                for s in self.sites[name]:
                    self.fixed[s] = f"module {name} is called {n} times"
        groups, index = [], {}
        space_group = {}
        for s in range(len(self.size)):
            r = self.find(s)
            if r not in index:
                index[r] = len(groups)
                groups.append(Group(index[r], self.size[s], [], [], [], self.side[s], True))
            g = groups[index[r]]
            if self.size[s] != g.size:
                raise PasError(f"channel spaces of {g.size} and {self.size[s]} channels are tied "
                               f"({self.producer[s]}); expected equal widths")
            g.spaces.append(s)
            g.producers.append(self.producer[s])
            g.sites.append(self.site_of.get(s, self.producer[s]))
            space_group[s] = g.index
            if s in self.fixed and g.prunable:
                g.prunable, g.reason = False, self.fixed[s]
        for g in groups:  # a fixed space found after the first one still fixes its group
            for s in g.spaces:
                if s in self.fixed:
                    g.prunable, g.reason = False, self.fixed[s]
                    break
            self.set_blocks(g)
        prunable = {g.index for g in groups if g.prunable}
        points = self.mask_points(prunable, space_group)
        return ChannelGraph(self.layers, groups, space_group, dict(self.size), points, in_channels,
                            tuple(input_shape))


def _flat(args, kwargs):
    out = []

    def walk(a):
        if isinstance(a, (list, tuple)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)
        else:
            out.append(a)
    walk(args)
    walk(kwargs)
    return out


def channel_graph(model: nn.Module, input_shape: tuple[int, ...]) -> ChannelGraph:
    """Trace `model` on the meta device and find its channel groups.

    `input_shape` is one example input's shape without the batch, e.g. (3, 224, 224). The global
    random state is left untouched (reading a fused block builds a conv, whose init draws from it).
    """
    with torch.random.fork_rng(devices=[]):
        return _channel_graph(model, input_shape)


def _channel_graph(model: nn.Module, input_shape: tuple[int, ...]) -> ChannelGraph:
    meta = copy.deepcopy(model).to("meta").eval()
    for m in meta.modules():  # gates of a gated model (pas.gates): a traced graph must not see them
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if "_pas_base" in type(m).__dict__:
            m.__class__ = type(m)._pas_base
    gm = trace(meta)
    gm._pas_root = type(model).__name__
    x = torch.zeros((2, *input_shape), device="meta")
    try:
        ShapeProp(gm).propagate(x)
    except PasError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise PasError(f"{type(model).__name__} does not run on a {tuple(input_shape)} input ({type(e).__name__}: "
                       f"{msg})") from None
    analysis = _Analysis(gm)
    analysis.run(input_shape[0])
    return analysis.result(input_shape[0], input_shape)
