"""The GPU paths, checked and measured in one run on one machine (`benchmarks/gpu`, < 8 minutes).

Checks (each prints `ok` or `FAILED: why`, and the script exits non-zero if any failed):
- AMP training resumes on CUDA with its GradScaler state (scale and growth tracker restored).
- DDP over NCCL through `pas`'s own launcher (`pas pretrain --nproc-per-node N`, torchrun), SyncBN
  and AMP on, when the machine has 2 or more GPUs (one GPU cannot host two NCCL ranks).
Measures (CUDA events after warm-up; ratios of two sides timed alternately in one process):
- train and search steps of RepVGG-B1 at 224 px: images/s in fp32 and with AMP + channels_last,
  and the search step's cost over a plain step (gates + MACs penalty);
- fused (deploy) vs multi-branch (training form) inference latency of RepVGG-B1;
- latency of compact PaS networks (RepVGG-B1 searched by a short search on generated data to the
  MACs of RepVGG-A0, A1 and B0) against A0, A1 and B0 themselves, at batch 1, 64 and 256.
Latency depends on the architecture, not on trained weights, so no data set is needed.

    python -m benchmarks.gpu            # on a GPU machine
    python -m benchmarks.gpu --quick    # small networks, on whatever device there is (a smoke run)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

FULL = dict(backbone="repvgg_b1", references=("repvgg_a0", "repvgg_a1", "repvgg_b0"), resolution=224,
            train_batch=64, batch_sizes=(1, 64, 256), search_steps=60, repeats=30, warmup=10)
QUICK = dict(backbone="repvgg_b1_mini", references=("repvgg_a0_mini", "repvgg_a1_mini", "repvgg_b0_mini"),
             resolution=32, train_batch=8, batch_sizes=(1, 8), search_steps=6, repeats=3, warmup=1)
FAILURES: list[str] = []


def check(ok: bool, what: str, why: str = "") -> None:
    print(f"  check: {what}: {'ok' if ok else 'FAILED: ' + why}", flush=True)
    if not ok:
        FAILURES.append(what)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = (f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}, CUDA {torch.version.cuda}, "
           f"cuDNN {torch.backends.cudnn.version()}") if device.type == "cuda" else "no GPU"
    return f"{gpu}; CPU {cpu} ({os.cpu_count()} cores); torch {torch.__version__}"


def timer(device: torch.device):
    """Seconds of `fn()`: CUDA events on a GPU (the kernels' time, not the launch's), else wall time."""
    def run(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def alternate(fns: dict, device, *, repeats: int, warmup: int) -> dict:
    """Median seconds of each callable, the callables taking turns (machine noise hits all)."""
    run, times = timer(device), {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for i in range(repeats):
        names = list(fns) if i % 2 == 0 else list(reversed(fns))
        for name in names:
            times[name].append(run(fns[name]))
    return {k: statistics.median(v) for k, v in times.items()}


def build(name: str, cfg: dict, device, *, deploy: bool = False, channels_last: bool = False):
    from pas.models import build as build_model
    model = build_model(name, num_classes=1000, resolution=cfg["resolution"], deploy=deploy).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def batch(cfg: dict, n: int, device, *, channels_last: bool = False):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, cfg["resolution"], cfg["resolution"], generator=g).to(device)
    y = torch.randint(0, 1000, (n,), generator=g).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def step_fn(model, x, y, *, amp: bool, penalty=None):
    """One SGD step as pas.engine.Trainer takes it (autocast, GradScaler, penalty outside autocast)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp)

    def step():
        with torch.autocast(x.device.type, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)[0]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def training_speed(cfg, device) -> None:
    from pas.gates import attach_gates
    from pas.search import MacsPenalty
    amp = device.type == "cuda"
    n = cfg["train_batch"]
    fp32 = build(cfg["backbone"], cfg, device)
    fast = build(cfg["backbone"], cfg, device, channels_last=amp)
    gated = build(cfg["backbone"], cfg, device, channels_last=amp)
    attach_gates(gated)
    penalty = MacsPenalty(gated.arch, int(gated.arch.macs() * 0.3))
    x, y = batch(cfg, n, device)
    xc, _ = batch(cfg, n, device, channels_last=amp)
    t = alternate({"fp32": step_fn(fp32, x, y, amp=False), "amp": step_fn(fast, xc, y, amp=amp),
                   "search": step_fn(gated, xc, y, amp=amp, penalty=penalty)},
                  device, repeats=max(5, cfg["repeats"] // 3), warmup=cfg["warmup"] // 2 + 1)
    mode = "AMP + channels_last" if amp else "fp32 (no CUDA: no AMP)"
    print(f"train step, {cfg['backbone']} at {cfg['resolution']} px, batch {n}:")
    print(f"  fp32: {n / t['fp32']:.0f} img/s; {mode}: {n / t['amp']:.0f} img/s ({t['fp32'] / t['amp']:.2f}x)")
    print(f"  search step (gates + MACs penalty) {n / t['search']:.0f} img/s: {t['search'] / t['amp']:.3f}x a "
          f"plain step")


def amp_resume(cfg, device) -> None:
    """A Trainer with AMP, stopped after epoch 2 and resumed: the scaler continues where it was."""
    from pas.engine import OptimConfig, Trainer, World
    if device.type != "cuda":
        print("AMP resume: no CUDA (AMP is CUDA-only in the Trainer); skipped")
        return
    x, y = batch(cfg, 4, device)
    with tempfile.TemporaryDirectory() as d:
        state = Path(d) / "state.pt"

        def trainer(epochs):
            model = build(cfg["backbone"], cfg, device, channels_last=True)
            return Trainer(model, train_loader=lambda epoch: [(x, y)] * 3, epochs=epochs,
                           optim=OptimConfig(lr=0.01), world=World(device=device), amp=True, state_path=state)
        first = trainer(2)
        first.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=2)
        first.fit()
        saved = first.scaler.state_dict()
        resumed = trainer(3)
        resumed.load_state()
        print("AMP resume on CUDA:")
        check(resumed.start_epoch == 2, "resumed after epoch 2", f"start epoch {resumed.start_epoch}")
        check(resumed.scaler.state_dict() == saved, "GradScaler state restored",
              f"{resumed.scaler.state_dict()} != {saved}")
        rows = resumed.fit()
        check(len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows), "the resumed epoch trains",
              f"{rows}")


def ddp(cfg, device) -> None:
    """`pas pretrain --nproc-per-node N` on the embedded digits: torchrun, NCCL, SyncBN, AMP."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        print(f"DDP over NCCL: {gpus} GPU(s) here; two ranks need two GPUs: skipped")
        return
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        cmd = [sys.executable, "-m", "pas.cli", "pretrain", "--set", "backbone=repvgg_a0_mini",
               "--set", "dataset.name=digits", "--set", "epochs=2", "--set", "batch_size=256",
               "--set", "tracking.enabled=false", "--set", "amp=true", "--set", "sync_bn=true",
               "--nproc-per-node", str(gpus), "--out-weights", str(out / "w.pt"), "--out-metrics", str(out / "m.json")]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
        print(f"DDP over NCCL, {gpus} ranks (pas pretrain, digits, 2 epochs): {wall:.0f} s")
        check(r.returncode == 0, "torchrun + NCCL + SyncBN + AMP run", r.stderr[-800:])
        if r.returncode == 0:
            import json
            top1 = json.loads((out / "m.json").read_text())["final_top1"]
            check(top1 > 50, "the DDP run learns (digits top-1 > 50% after 2 epochs)", f"top-1 {top1}")


def fusion(cfg, device) -> None:
    from pas.reparam import reparameterize
    train_form = build(cfg["backbone"], cfg, device).eval()
    fused = reparameterize(build(cfg["backbone"], cfg, device)).eval()
    n = cfg["batch_sizes"][1]
    x, _ = batch(cfg, n, device)
    with torch.no_grad():
        t = alternate({"multi": lambda: train_form(x), "fused": lambda: fused(x)}, device,
                      repeats=cfg["repeats"], warmup=cfg["warmup"])
    print(f"inference, {cfg['backbone']} batch {n}, fp32: multi-branch {t['multi'] * 1e3:.2f} ms, fused "
          f"{t['fused'] * 1e3:.2f} ms ({t['multi'] / t['fused']:.2f}x faster fused)")


def searched(cfg, target: int, device):
    """RepVGG-B1 searched to `target` MACs by a short search on random data, compact and fused."""
    from pas.compact import compact
    from pas.engine import OptimConfig, World
    from pas.search import search
    model = build(cfg["backbone"], cfg, device)
    steps = [batch(cfg, cfg["train_batch"], device, channels_last=False) for _ in range(1)] * cfg["search_steps"]
    result = search(model, steps, target=target, epochs=1, alpha=50.0,
                    optim=OptimConfig(lr=0.02, schedule="constant", gate_lr_scale=20.0), world=World(device=device))
    return compact(model.cpu()).to(device).eval(), result


def latency_table(cfg, device) -> None:
    """Each PaS network against the uniform family member at its MACs, per batch size."""
    from pas.models import arch_for
    print(f"latency, fp32, CUDA events ({cfg['repeats']} runs after {cfg['warmup']} warm-up):" if device.type == "cuda"
          else "latency, fp32, wall time:")
    rows = []
    for ref in cfg["references"]:
        target = int(arch_for(ref, num_classes=1000, resolution=cfg["resolution"]).macs())
        pas_net, result = searched(cfg, target, device)
        plain = build(ref, cfg, device, deploy=True).eval()
        for b in cfg["batch_sizes"]:
            x, _ = batch(cfg, b, device)
            with torch.no_grad():
                t = alternate({"pas": lambda: pas_net(x), "ref": lambda: plain(x)}, device,
                              repeats=cfg["repeats"], warmup=cfg["warmup"])
            rows.append({"PaS network": f"PaS-{ref.split('_')[1].upper()} ({cfg['backbone']})",
                         "PaS MMACs": result.macs / 1e6, "uniform member": ref, "member MMACs": target / 1e6,
                         "batch": b, "PaS ms": t["pas"] * 1e3, "member ms": t["ref"] * 1e3,
                         "PaS / member": t["pas"] / t["ref"]})
        check(abs(result.macs / target - 1) < 0.01, f"PaS network at {ref}'s MACs within 1%",
              f"{result.macs} vs {target}")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small networks, few repeats: a smoke run on any device")
    a = p.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif not a.quick:
        print("no CUDA device: run with --quick for a smoke run on the CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"machine: {machine(device)}")
    torch.manual_seed(0)
    for part in (amp_resume, ddp, training_speed, fusion, latency_table):
        part(cfg, device)
    print(f"total {time.perf_counter() - t0:.0f} s; {len(FAILURES)} failed check(s)"
          + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
