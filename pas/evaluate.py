"""Accuracy, MACs, params and measured latency/throughput of a deployed network."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from pas.engine import evaluate
from pas.flops import ptflops_macs
from pas.latency import machine


@torch.no_grad()
def latency(model: nn.Module, batch: int, *, device: str = "cpu", repeats: int = 20, warmup: int = 5) -> dict:
    """Median wall time of one forward pass (ms) and the throughput it implies (images/s)."""
    a = model.arch
    x = torch.randn(batch, a.in_channels, a.resolution, a.resolution, device=device)
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    return {"latency_ms": ms, "throughput": batch / (ms / 1000)}


def evaluate_deployed(model: nn.Module, val_loader, *, batch_sizes=(1, 64), repeats: int = 20,
                      warmup: int = 5, threads: int = 1, quality=None) -> dict:
    """`quality(model) -> dict`: the task's metrics (default: top-1/top-5 of a classifier)."""
    a = model.arch
    metrics = quality(model) if quality is not None else evaluate(model, val_loader)
    out = {**metrics, "macs": int(a.macs()),
           "macs_ptflops": ptflops_macs(model, a.in_channels, a.resolution), "params": int(a.params()),
           "widths": a.searchable_widths(), "threads": threads, "machine": machine(threads)}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            for b in batch_sizes:
                r = latency(model, b, device=device, repeats=repeats, warmup=warmup)
                out[f"latency_ms_{device}_b{b}"] = r["latency_ms"]
                out[f"throughput_{device}_b{b}"] = r["throughput"]
    finally:
        torch.set_num_threads(previous)
        model.cpu()
    return out
