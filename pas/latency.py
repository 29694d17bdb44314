"""Latency of deployed networks, measured side by side in one process, as they are deployed.

Every network is timed with PyTorch and with ONNX Runtime (its exported model.onnx), on the CPU and
on a GPU when one is there, at each batch size, with the thread count fixed. The networks are timed
alternately: each round runs every network once, in an order that rotates from round to round, so
a change in the machine's load or clock during the measurement reaches every network alike instead
of the one timed at that moment. The reported value is the median over the rounds (and the
interquartile range, to show the noise); `pas latency` writes one JSON with the machine it ran on.

In the workflow this runs as one job after every network is deployed, alone on its machine (all its
cores locally, an exclusive node on SLURM): latencies measured while other jobs train are not
comparable with each other.
"""
from __future__ import annotations

import copy
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pas.errors import PasError

RUNTIMES = ("pytorch", "onnxruntime")


@dataclass(frozen=True)
class Case:
    """One timed configuration of one network: a zero-argument call that runs one forward pass."""
    model: str
    runtime: str
    device: str
    batch: int
    run: Callable[[], object]


def median_and_iqr(values: list[float]) -> tuple[float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q3 - q1


# glibc's mallopt parameters: keep freed memory in the process (see keep_freed_memory)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_TRIM_BYTES = 1 << 30
KEPT_MMAP_BYTES = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit machines
_allocator: str | None = None


def keep_freed_memory() -> str:
    """Have the C allocator keep memory a forward pass frees for the next pass, as a served model's
    process does with jemalloc or TCMalloc (Intel's PyTorch tuning guide, "Memory Allocator"), and
    say what the allocator is (recorded with every measurement). With glibc's defaults a pass of a
    wide network returns its activations to the system and page-faults them in again on the next
    pass (about 2,900 faults per pass of mobilenetv2_mini_035 at batch 64, more than doubling its
    latency), by an amount that depends on what ran before rather than on the network's widths.
    glibc: blocks up to 32 MiB come from the heap, and the heap is trimmed only above 1 GiB free.
    Other C libraries are left as they are. Idempotent; affects the whole process."""
    global _allocator
    if _allocator is None:
        libc, version = platform.libc_ver()
        if libc == "glibc":
            import ctypes
            mallopt = ctypes.CDLL(None).mallopt
            ok = mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_BYTES) and mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_BYTES)
            _allocator = (f"glibc {version}, freed memory kept (trim threshold 1 GiB, mmap threshold 32 MiB)" if ok
                          else f"glibc {version}, defaults (mallopt refused)")
        else:
            _allocator = f"{libc or platform.system()} system allocator, as is"
    return _allocator


def time_alternately(cases: list[Case], *, rounds: int, warmup: int,
                     clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Median and IQR (ms) of each case's call over `rounds` rounds; every round calls every case
    once, starting one case further along than the round before. `warmup` untimed rounds first.
    Freed memory stays in the process (`keep_freed_memory`)."""
    keep_freed_memory()
    if rounds < 2:
        raise PasError(f"latency rounds {rounds}: expected at least 2 (a median and a spread)")
    times: list[list[float]] = [[] for _ in cases]
    for r in range(warmup + rounds):
        for k in range(len(cases)):
            i = (r + k) % len(cases)
            t0 = clock()
            cases[i].run()
            elapsed = clock() - t0
            if r >= warmup:
                times[i].append(elapsed * 1000)
    rows = []
    for case, ms in zip(cases, times):
        median, iqr = median_and_iqr(ms)
        rows.append({"model": case.model, "runtime": case.runtime, "device": case.device, "batch": case.batch,
                     "latency_ms": median, "iqr_ms": iqr, "throughput": case.batch / (median / 1000),
                     "rounds": rounds})
    return rows


def _torch_call(model: torch.nn.Module, x: torch.Tensor, device: str) -> Callable[[], object]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    @torch.no_grad()
    def run():
        model(x)
        sync()
    return run


def _onnx_call(path: Path, x: np.ndarray, device: str, threads: int) -> Callable[[], object]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    session = ort.InferenceSession(str(path), options, providers=[provider])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def devices(runtime: str) -> list[str]:
    """Where a runtime can run here: the CPU, and CUDA when this machine (and runtime build) has it."""
    if runtime == "pytorch":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    import onnxruntime as ort
    return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])


def _example(arch, batch: int) -> torch.Tensor:
    return torch.randn(batch, arch.in_channels, arch.resolution, arch.resolution,
                       generator=torch.Generator().manual_seed(batch))


def torch_cases(name: str, model: torch.nn.Module, *, batch_sizes) -> list[Case]:
    """PyTorch's timed cases of a network: every device here (one copy per GPU), every batch size."""
    cases = []
    for device in devices("pytorch"):
        net = model if device == "cpu" else copy.deepcopy(model).cuda()
        for b in batch_sizes:
            run = _torch_call(net, _example(model.arch, b).to(device), device)
            cases.append(Case(name, "pytorch", device, int(b), run))
    return cases


def onnx_cases(name: str, path: Path, arch, *, batch_sizes) -> list[Case]:
    """ONNX Runtime's timed cases of an exported network, with this process's torch thread count."""
    return [Case(name, "onnxruntime", device, int(b),
                 _onnx_call(path, _example(arch, b).numpy(), device, torch.get_num_threads()))
            for device in devices("onnxruntime") for b in batch_sizes]


def cases_for(name: str, folder: str | Path, *, batch_sizes, runtimes=RUNTIMES) -> list[Case]:
    """The timed cases of one deployed network (pas deploy's folder)."""
    from pas.deploy import load_deployed
    folder = Path(folder)
    for needed in ("arch.json", "model.safetensors", "model.onnx"):
        if not (folder / needed).is_file():
            raise PasError(f"deployed network {str(folder)!r} has no {needed}; expected the folder pas deploy wrote")
    model = load_deployed(folder / "arch.json", folder / "model.safetensors").eval()
    cases = []
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            raise PasError(f"latency runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        cases += (torch_cases(name, model, batch_sizes=batch_sizes) if runtime == "pytorch" else
                  onnx_cases(name, folder / "model.onnx", model.arch, batch_sizes=batch_sizes))
    return cases


def cpu_model() -> str | None:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), else what platform knows, else None."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(threads: int) -> dict:
    """Where latencies were measured: latencies from different CPU or GPU models (or thread counts)
    are not comparable, so every measurement says which ones it ran on."""
    return {"host": socket.gethostname(), "cpu": cpu_model(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "allocator": keep_freed_memory(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def measure(models: dict[str, str | Path], *, batch_sizes=(1, 64), rounds: int = 20, warmup: int = 5,
            threads: int = 1, runtimes=RUNTIMES) -> dict:
    """Latency of every deployed network (name -> folder), all runtimes/devices/batches alternately."""
    if not models:
        raise PasError("no deployed networks to time")
    if threads < 1 or any(b < 1 for b in batch_sizes):
        raise PasError(f"latency threads {threads}, batch sizes {list(batch_sizes)}: expected positive integers")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [c for name, folder in models.items() for c in cases_for(name, folder, batch_sizes=batch_sizes,
                                                                          runtimes=runtimes)]
        rows = time_alternately(cases, rounds=rounds, warmup=warmup)
    finally:
        torch.set_num_threads(previous)
    import onnxruntime as ort
    return {"machine": machine(threads), "threads": threads, "rounds": rounds, "warmup": warmup,
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__}, "rows": rows}


def main(args) -> int:
    from pas.config import named_values
    from pas.io import atomic_write_json
    models = named_values(args.model, option="--model", value="DEPLOYED_FOLDER")
    result = measure(models, batch_sizes=args.batch_sizes, rounds=args.rounds, warmup=args.warmup,
                     threads=args.threads, runtimes=args.runtimes)
    atomic_write_json(args.out, result)
    for r in result["rows"]:
        print(f"{r['model']:>24} {r['runtime']:>11} {r['device']:>4} b{r['batch']:<4} "
              f"{r['latency_ms']:9.3f} ms (IQR {r['iqr_ms']:.3f})")
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("latency", help="time deployed networks side by side (PyTorch and ONNX Runtime)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                   help="a deployed network (pas deploy's --out-dir) and the name it is reported under (repeat)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=20, help="timed rounds; the median is reported (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of both runtimes (default 1)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--out", required=True, help="the JSON written (atomically)")
    p.set_defaults(func=main)
