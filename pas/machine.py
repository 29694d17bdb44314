"""What a training run ran on: the facts that make two machines' results differ.

Two runs of a stage on one machine give bit-identical weights; on two machines they may not, since
PyTorch's CPU kernels pick their vector width (AVX2, AVX-512, ...) at run time and sum in another
order, and the thread count splits the reductions differently. Every training run records these
(metrics JSON and MLflow tags), so a table that differs between machines says why.
"""
from __future__ import annotations

import platform
import sys


def machine_record() -> dict:
    import numpy
    import torch
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": sys.platform,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def machine_tags() -> dict:
    """The record as MLflow tags (`machine.cpu_capability`, ...)."""
    return {f"machine.{k}": str(v) for k, v in machine_record().items()}
