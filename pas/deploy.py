"""The deployable artefact: architecture JSON + safetensors weights + ONNX, loadable without search code."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from pas.errors import PasError
from pas.io import atomic_folder, atomic_write_json, chmod_default


def export_onnx(model: nn.Module, path: str | Path) -> None:
    """ONNX with a dynamic batch axis (TorchScript exporter: needs no extra packages)."""
    a = model.arch
    x = torch.randn(1, a.in_channels, a.resolution, a.resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def onnx_max_error(model: nn.Module, path: str | Path) -> float | None:
    """Max-abs difference between onnxruntime's and PyTorch's outputs, None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    a = model.arch
    x = torch.randn(3, a.in_channels, a.resolution, a.resolution)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = model.eval()(x).detach().numpy()
    theirs = session.run(None, {"input": x.numpy()})[0]
    return float(abs(ours - theirs).max())


def save_deployed(model: nn.Module, out_dir: str | Path, **extra) -> dict:
    """Write arch.json, model.safetensors, model.onnx and deploy.json into `out_dir`, all or nothing."""
    from safetensors.torch import save_file
    with atomic_folder(out_dir) as tmp:
        atomic_write_json(tmp / "arch.json", model.arch.to_dict())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        chmod_default(tmp / "model.safetensors")
        export_onnx(model, tmp / "model.onnx")
        record = {"macs": int(model.arch.macs()), "params": int(model.arch.params()),
                  "widths": model.arch.searchable_widths(),
                  "onnx_max_abs_err": onnx_max_error(model, tmp / "model.onnx"), **extra}
        atomic_write_json(tmp / "deploy.json", record)
    return record


def load_network(path: str | Path):
    """The Network an arch.json describes (backbone, input, widths of every searched group)."""
    import json

    from pas.models import network_from_dict
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise PasError(f"architecture file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PasError(f"architecture file {str(path)!r} is not valid JSON: {e}") from None
    return network_from_dict(d)


def load_deployed(arch_path: str | Path, weights_path: str | Path) -> nn.Module:
    """Build the plain network from its architecture JSON and load its weights (no pickle)."""
    from pas.checkpoints import load_checkpoint
    from pas.models import build_deployed
    model = build_deployed(load_network(arch_path))
    if not Path(weights_path).exists():
        raise PasError(f"weights file {str(weights_path)!r} does not exist")
    load_checkpoint(str(weights_path), model)
    return model.eval()
