"""Load RepVGG weights saved under our, the official repository's, or timm's parameter names.

The naming scheme is detected from the keys (after dropping a DistributedDataParallel `module.`
prefix). Block index i counts the stem as block 0 and then every block of every stage in order, so
official `stage1.0` / timm `stages.0.0` is our `blocks.1`. <bn> is any of weight, bias,
running_mean, running_var, num_batches_tracked.

  official (DingXiaoH/RepVGG repvgg.py)  timm (byobnet RepVggBlock)      ours (pas.models.repvgg)
  stage0.<part>                          stem.<part>                     blocks.0.<part>
  stage<k>.<j>.<part>   (k = 1..4)       stages.<k-1>.<j>.<part>         blocks.<i>.<part>
    rbr_dense.conv.weight                  conv_kxk.conv.weight            rbr_dense.0.weight
    rbr_dense.bn.<bn>                      conv_kxk.bn.<bn>                rbr_dense.1.<bn>
    rbr_1x1.conv.weight                    conv_1x1.conv.weight            rbr_1x1.0.weight
    rbr_1x1.bn.<bn>                        conv_1x1.bn.<bn>                rbr_1x1.1.<bn>
    rbr_identity.<bn>                      identity.<bn>                   rbr_identity.<bn>
    rbr_reparam.{weight,bias}  (deploy)    reparam_conv.{weight,bias}      conv.{weight,bias}  (deploy=True)
  linear.{weight,bias}                   head.fc.{weight,bias}           fc.{weight,bias}

torchvision's MobileNetV2 (`features.*`, `classifier.1.*`) maps onto ours (pas.models.mobilenetv2):
features.0 -> stem, features.i -> blocks.(i-1) (conv.0 expand, conv.1 depth-wise, conv.2/3 project
conv/BN; a block without expansion starts at the depth-wise conv), features.18 -> head,
classifier.1 -> fc. torchvision's ResNets and every `torchvision:NAME` network use torchvision's own
key names, so their files load as they are.

Not mappable, refused with a message: squeeze-excitation blocks (official `use_se=True` keys
`*.se.down/up.*`, timm `repvgg_d2se` keys `*.attn.*`), since our RepVGG has no SE layer; and
RepVGGplus checkpoints (`stage3_first`, `stage1_aux`, ...), a different network. timm's
`final_conv` is an Identity for every RepVGG config, so it has no keys.

Files are read with torch.load(weights_only=True) only (or safetensors), never by unpickling
arbitrary objects.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pas.errors import PasError

FORMATS = ("pas", "official", "timm", "torchvision")

_OFFICIAL_BLOCK = re.compile(r"^stage(\d+)\.(\d+)\.(.+)$")
_OFFICIAL_STEM = re.compile(r"^stage0\.(\D.*)$")
_TIMM_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")
_TIMM_STEM = re.compile(r"^stem\.(.+)$")

# Branch prefixes inside one block -> ours; the rest of the key (the parameter name) is kept.
_PARTS = {
    "official": {"rbr_dense.conv.": "rbr_dense.0.", "rbr_dense.bn.": "rbr_dense.1.",
                 "rbr_1x1.conv.": "rbr_1x1.0.", "rbr_1x1.bn.": "rbr_1x1.1.",
                 "rbr_identity.": "rbr_identity.", "rbr_reparam.": "conv."},
    "timm": {"conv_kxk.conv.": "rbr_dense.0.", "conv_kxk.bn.": "rbr_dense.1.",
             "conv_1x1.conv.": "rbr_1x1.0.", "conv_1x1.bn.": "rbr_1x1.1.",
             "identity.": "rbr_identity.", "reparam_conv.": "conv."},
}
_DEPLOY_PART = {"official": "rbr_reparam.", "timm": "reparam_conv."}
_SE_PART = {"official": "se.", "timm": "attn."}
_HEADS = {"official": {"linear.weight": "fc.weight", "linear.bias": "fc.bias"},
          "timm": {"head.fc.weight": "fc.weight", "head.fc.bias": "fc.bias"}}

_PAS_KEY = re.compile(r"^(blocks\.\d+\.|fc\.(weight|bias)$)")
_PAS_DEPLOY = re.compile(r"^blocks\.\d+\.conv\.(weight|bias)$")
_PAS_TRAIN = re.compile(r"^blocks\.\d+\.rbr_")
_TV_BLOCK = re.compile(r"^features\.\d+\.conv\.")  # torchvision's MobileNetV2 inverted residuals
_REPVGGPLUS = re.compile(r"^stage\d+_(first|second|aux)")


def _strip_module_prefix(state_dict: Mapping) -> dict:
    keys = list(state_dict)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _first(keys, n: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def detect_format(state_dict: Mapping) -> str:
    """'pas', 'official' or 'timm', from the key names; PasError if none (or several) fit."""
    keys = [k for k in _strip_module_prefix(state_dict) if isinstance(k, str)]
    found = []
    if any(_OFFICIAL_BLOCK.match(k) or _OFFICIAL_STEM.match(k) for k in keys):
        found.append("official")
    if any(_TIMM_BLOCK.match(k) or (_TIMM_STEM.match(k) and _TIMM_STEM.match(k).group(1).split(".")[0]
                                   in ("conv_kxk", "conv_1x1", "identity", "reparam_conv")) for k in keys):
        found.append("timm")
    if any(_PAS_KEY.match(k) for k in keys):
        found.append("pas")
    if any(_TV_BLOCK.match(k) for k in keys) and any(k.startswith("classifier.") for k in keys):
        found.append("torchvision")
    if any(_REPVGGPLUS.match(k) for k in keys):
        raise PasError(f"RepVGGplus checkpoint (key {next(k for k in keys if _REPVGGPLUS.match(k))!r}) "
                       f"is a different network; expected RepVGG weights")
    if len(found) != 1:
        what = "mixes " + " and ".join(found) + " names" if found else "matches none"
        raise PasError(f"unknown naming scheme: the keys ({_first(keys)}) {what}; expected ours "
                       f"('blocks.0.rbr_dense.0.weight'), the official RepVGG's ('stage0.rbr_dense.conv.weight') "
                       f"or timm's ('stem.conv_kxk.conv.weight')")
    return found[0]


_TV_FEATURE = re.compile(r"^features\.(\d+)\.(.+)$")


def _torchvision_mobilenetv2(state_dict: Mapping) -> tuple[dict, dict]:
    """torchvision's MobileNetV2 names -> ours (see the table in the module docstring)."""
    last = max(int(m.group(1)) for k in state_dict if (m := _TV_FEATURE.match(k)))
    out, origin = {}, {}
    for key, value in state_dict.items():
        new, m = key, _TV_FEATURE.match(key)
        if key.startswith("classifier.1."):
            new = "fc." + key[len("classifier.1."):]
        elif m:
            i, rest = int(m.group(1)), m.group(2)
            if i in (0, last):
                part, _, tail = rest.partition(".")
                new = f"{'stem' if i == 0 else 'head'}.{ {'0': 'conv', '1': 'bn'}.get(part, part)}.{tail}"
            elif rest.startswith("conv."):
                expands = f"features.{i}.conv.3.weight" in state_dict
                names = (["expand", "depthwise"] if expands else ["depthwise"])
                idx, _, tail = rest[len("conv."):].partition(".")
                j = int(idx)
                if j < len(names):  # a ConvBNActivation: .0 conv, .1 BN
                    sub, _, param = tail.partition(".")
                    new = f"blocks.{i - 1}.{names[j]}.{ {'0': 'conv', '1': 'bn'}[sub]}.{param}"
                else:  # the projection: a plain conv, then its BN
                    new = f"blocks.{i - 1}.project.{'conv' if j == len(names) else 'bn'}.{tail}"
        out[new], origin[new] = value, key
    return out, origin


def _convert(state_dict: Mapping, fmt: str, source: str) -> tuple[dict, dict]:
    """(ours_key -> tensor, ours_key -> original key). Unrecognised keys keep their own name."""
    if fmt == "pas":
        return dict(state_dict), {k: k for k in state_dict}
    if fmt == "torchvision":
        return _torchvision_mobilenetv2(state_dict)
    block_re, stem_re = (_OFFICIAL_BLOCK, _OFFICIAL_STEM) if fmt == "official" else (_TIMM_BLOCK, _TIMM_STEM)
    stage_offset = 0 if fmt == "official" else 1      # timm's stages.0 is official stage1
    parsed, blocks = {}, set()
    for key in state_dict:
        m = block_re.match(key)
        if m:
            pos, rest = (int(m.group(1)) + stage_offset, int(m.group(2))), m.group(3)
        else:
            m = stem_re.match(key)
            if not m:
                continue
            pos, rest = (0, 0), m.group(1)
        if rest.startswith(_SE_PART[fmt]):
            raise PasError(f"{source}: key {key!r} belongs to a squeeze-excitation layer, which our RepVGG does "
                           f"not have; SE variants ({'use_se=True' if fmt == 'official' else 'repvgg_d2se'}) "
                           f"cannot be mapped")
        parsed[key] = (pos, rest)
        blocks.add(pos)
    index = {pos: i for i, pos in enumerate(sorted(blocks))}
    out, origin = {}, {}
    for key, value in state_dict.items():
        new = _HEADS[fmt].get(key, key)
        if key in parsed:
            pos, rest = parsed[key]
            for prefix, ours in _PARTS[fmt].items():
                if rest.startswith(prefix):
                    new = f"blocks.{index[pos]}.{ours}{rest[len(prefix):]}"
                    break
        out[new] = value
        origin[new] = key
    return out, origin


def _checkpoint_form(keys, fmt: str) -> str | None:
    if fmt == "pas":
        if any(_PAS_DEPLOY.match(k) for k in keys):
            return "deploy"
        return "training" if any(_PAS_TRAIN.match(k) for k in keys) else None
    if any(f".{_DEPLOY_PART[fmt]}" in k for k in keys):
        return "deploy"
    return "training"


def _model_form(model: nn.Module) -> str | None:
    from pas.models.repvgg import RepVGG, RepVGGBlock
    if not isinstance(model, RepVGG) or len(model.blocks) == 0:
        return None
    return "training" if isinstance(model.blocks[0], RepVGGBlock) else "deploy"


def to_pas_state_dict(state_dict: Mapping, model: nn.Module, *, source: str = "checkpoint") -> dict:
    """`state_dict` (any supported naming) renamed to `model`'s keys, with every shape checked.

    Keys that the detected scheme does not know are passed through under their own names, so a
    strict load reports them as unexpected.
    """
    return _to_pas(state_dict, model, source)[0]


def format_of(state_dict: Mapping, model: nn.Module) -> str:
    """'pas' when a network other than RepVGG gets its own key names (ours; torchvision's for the
    torchvision-layout ResNets and torchvision: models), else detect_format's answer."""
    state_dict = _strip_module_prefix(state_dict)
    keys = {k for k in state_dict if isinstance(k, str)}
    ours = {k for k in model.state_dict() if not k.startswith("pas_gates.")}
    if _model_form(model) is None and keys & ours and all(k in ours or k.endswith("num_batches_tracked")
                                                        for k in keys):
        return "pas"
    return detect_format(state_dict)


def _to_pas(state_dict: Mapping, model: nn.Module, source: str) -> tuple[dict, dict]:
    return _convert_checked(state_dict, model, source, check=True)


def _convert_checked(state_dict: Mapping, model: nn.Module, source: str, *, check: bool) -> tuple[dict, dict]:
    """The renamed state dict and each key's original name; with `check`, every shape checked."""
    state_dict = _strip_module_prefix(state_dict)
    fmt = format_of(state_dict, model)
    if fmt == "torchvision":
        from pas.models.mobilenetv2 import MobileNetV2
        if not isinstance(model, MobileNetV2):
            raise PasError(f"{source} holds torchvision MobileNetV2 weights but the model is a "
                           f"{type(model).__name__}; expected a MobileNetV2 built by pas.models.build")
        converted, origin = _convert(state_dict, fmt, source)
        if check:
            _check_shapes(converted, origin, model, source)
        return converted, origin
    form, model_form = _checkpoint_form(state_dict, fmt), _model_form(model)
    if fmt != "pas" and model_form is None:
        raise PasError(f"{source} holds {fmt} RepVGG weights but the model is a {type(model).__name__}; "
                       f"expected a RepVGG built by pas.models.build")
    if form and model_form and form != model_form:
        raise PasError(f"{source} holds {form}-form RepVGG weights but the model is in {model_form} form; "
                       f"build it with deploy={form == 'deploy'}")
    converted, origin = _convert(state_dict, fmt, source)
    if check:
        _check_shapes(converted, origin, model, source)
    return converted, origin


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """The parameters of the network's classifier: its last nn.Linear (every registered network and
    torchvision classifier ends in one), or () if it has none."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return ()
    return tuple(f"{last}.{p}" for p, _ in model.get_submodule(last).named_parameters(recurse=False))


def _class_count_only(converted: dict, model: nn.Module) -> dict | None:
    """{our key: (checkpoint classes, model classes)} when the classifier's tensors are the ONLY ones
    whose shape differs, and only in their first dimension (the class count); else None."""
    expected = model.state_dict()
    differing = {k for k, v in converted.items() if isinstance(v, torch.Tensor) and k in expected
                 and tuple(v.shape) != tuple(expected[k].shape)}
    head = set(classifier_keys(model))
    if not differing or not differing <= head:
        return None
    for key in differing:
        theirs, ours = converted[key].shape, expected[key].shape
        if len(theirs) != len(ours) or tuple(theirs[1:]) != tuple(ours[1:]):
            return None
    return {k: (int(converted[k].shape[0]), int(expected[k].shape[0])) for k in sorted(differing)}


def _check_shapes(converted: dict, origin: dict, model: nn.Module, source: str) -> None:
    expected = model.state_dict()
    for key, value in converted.items():
        if not isinstance(value, torch.Tensor):
            raise PasError(f"{source}: key {origin[key]!r} holds a {type(value).__name__}, expected a tensor")
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            ours = f" (our {key!r})" if origin[key] != key else ""
            raise PasError(f"{source}: key {origin[key]!r}{ours} has shape {tuple(value.shape)}, expected "
                           f"{tuple(expected[key].shape)}; the weights are for another architecture or class count")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _one_line(error: BaseException) -> str:
    text = str(error)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:  # torch's weights-only refusal: keep the reason, drop the advice around it
        text = re.split(r"\.\s+(?:Please|Check)\b", m.group(1))[0]
    else:
        text = re.split(r"(?<=[^.\s]{2})\.\s", text)[0]   # the first sentence
    text = " ".join(text.split())
    text = (text[:160] + "...") if len(text) > 160 else text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read(path: Path):
    if not path.exists():
        raise PasError(f"checkpoint {path} not found")
    if not path.is_file():
        raise PasError(f"checkpoint {path} is not a file")
    if _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError and friends: the header or data is incomplete
            raise PasError(f"checkpoint {path} is truncated or corrupt (safetensors {_one_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise PasError(f"checkpoint {path} is not a weights file: it holds pickled data that weights-only "
                           f"loading refuses ({_one_line(e)}); save model.state_dict() instead") from None
        raise PasError(f"checkpoint {path} is truncated or corrupt, or not a PyTorch or safetensors file "
                       f"({_one_line(e)})") from None
    except Exception as e:  # RuntimeError (zip reader), EOFError, KeyError on garbage, ...
        raise PasError(f"checkpoint {path} is truncated or corrupt, or not a PyTorch or safetensors file "
                       f"({_one_line(e)})") from None


def _state_dict_of(obj, path: Path) -> dict:
    def is_weights(d) -> bool:
        return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())

    if not isinstance(obj, Mapping):
        raise PasError(f"checkpoint {path} is not a weights file: it holds a {type(obj).__name__}, expected a "
                       f"state_dict (a dict of tensors)")
    if is_weights(obj):
        return dict(obj)
    for key in ("state_dict", "model"):
        if is_weights(obj.get(key)):
            return dict(obj[key])
    raise PasError(f"checkpoint {path} is not a weights file: expected a dict of tensors or a dict with a "
                   f"'state_dict' or 'model' entry holding one; found keys {_first(obj, 5)}")


@dataclass(frozen=True)
class Loaded:
    """What load_checkpoint did: the naming scheme found, and the classifier it left freshly initialised
    (None when every tensor was loaded)."""

    format: str
    new_classifier: str | None = None
    checkpoint_classes: int | None = None
    classes: int | None = None

    def message(self, path) -> str:
        text = f"loaded {path} ({self.format} names)"
        if self.new_classifier:
            text += (f"; the classifier {self.new_classifier} is new: the checkpoint has "
                     f"{self.checkpoint_classes} classes, the data {self.classes}, so it starts from a fresh "
                     f"initialisation and every other tensor from the checkpoint")
        return text


def load_checkpoint(path: str | Path, model: nn.Module, *, strict: bool = True,
                    new_classifier: bool = False) -> str:
    """Load weights from `path` into `model` in place; return the naming scheme that was found.
    See load_weights for `new_classifier`."""
    return load_weights(path, model, strict=strict, new_classifier=new_classifier).format


def load_weights(path: str | Path, model: nn.Module, *, strict: bool = True,
                 new_classifier: bool = False) -> Loaded:
    """Load weights from `path` into `model` in place.

    With `new_classifier`, a checkpoint trained for another number of classes (ImageNet weights on
    one's own data set) loads too: when the classifier's weight and bias are the only tensors whose
    shape differs, and only in the class count, they keep the model's own initialisation and every
    other tensor is loaded. Any other mismatch is an error, as without it."""
    path = Path(path)
    state_dict = _state_dict_of(_read(path), path)
    fmt = format_of(state_dict, model)
    head = None
    if new_classifier:
        converted, origin = _convert_checked(state_dict, model, f"checkpoint {path}", check=False)
        head = _class_count_only(converted, model)
        if head:
            converted = {k: v for k, v in converted.items() if k not in head}
        _check_shapes(converted, origin, model, f"checkpoint {path}")
    else:
        converted, origin = _to_pas(state_dict, model, f"checkpoint {path}")
    expected = model.state_dict()
    if strict:
        # BatchNorm fills a missing num_batches_tracked itself (older checkpoints lack it); a new
        # classifier is missing on purpose.
        missing = [k for k in expected if k not in converted and not k.endswith("num_batches_tracked")
                   and not (head and k in head)]
        unexpected = [origin[k] for k in converted if k not in expected]   # in the checkpoint's names
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys ({_first(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
            raise PasError(f"checkpoint {path} ({fmt} names) does not fit the model: {' and '.join(parts)}")
    try:
        model.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=False)
    except RuntimeError as e:
        raise PasError(f"checkpoint {path}: {_one_line(e)}") from None
    if not head:
        return Loaded(fmt)
    theirs, ours = next(iter(head.values()))
    return Loaded(fmt, new_classifier=next(iter(head)).rsplit(".", 1)[0], checkpoint_classes=theirs, classes=ours)
