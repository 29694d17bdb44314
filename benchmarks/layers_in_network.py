"""Each conv and linear layer timed inside the network against the same layer timed alone: where a
latency table of layers timed one by one (`pas latency-table`) goes wrong.

The compact network (BN folded, random weights: latency depends on the architecture) at uniform
width scales. Inside the network a layer is timed by forward hooks around its call, over `--rounds`
forward passes (the median per layer); then the network without hooks and every layer alone (on an
input of the shape it saw inside) are timed alternately in one loop, `--rounds` rounds
(`pas.latency.time_alternately`, as `pas latency` and `pas latency-table` time). Prints, per scale: the network's
latency, the layers' sum inside the network and alone, the share of the network outside the layers
(activations, residual additions, pooling, the calls themselves), and the layers whose two times
differ most.

    python -m benchmarks.layers_in_network [--backbone mobilenetv2_mini_035] [--batch 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from pas.landing import WidthRule
from pas.latency import Case, _torch_call, keep_freed_memory, time_alternately
from pas.latency_table import _compact_at
from pas.models import build


def profile(net: nn.Module, x: torch.Tensor, rounds: int, warmup: int) -> dict:
    """The network's latency without hooks, and each layer's inside it and alone (ms). The layers
    inside are timed by hooks over `rounds` passes; the network without hooks and every layer alone
    are then timed alternately in one loop (`pas.latency.time_alternately`), so a change in the
    machine's speed reaches them alike. Freed memory stays in the process throughout (as
    `pas.latency` times)."""
    keep_freed_memory()
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    inside: dict[str, list[float]] = {n: [] for n, _ in layers}
    shapes, started, handles = {}, {}, []

    def ended(name):
        def hook(module, inputs, output):  # returns None: the output stays the layer's
            inside[name].append(time.perf_counter() - started[name])
            shapes[name] = inputs[0].shape
        return hook

    for n, m in layers:
        handles.append(m.register_forward_pre_hook(lambda m, i, n=n: started.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(ended(n)))
    with torch.no_grad():
        for r in range(warmup + rounds):
            net(x)
            if r < warmup:
                for v in inside.values():
                    v.clear()
    for h in handles:
        h.remove()
    cases = [Case("network", "pytorch", "cpu", len(x), _torch_call(net, x, "cpu"))]
    cases += [Case(n, "pytorch", "cpu", len(x), _torch_call(m, torch.randn(shapes[n]), "cpu")) for n, m in layers]
    ms = {c.model: r["latency_ms"] for c, r in zip(cases, time_alternately(cases, rounds=rounds, warmup=warmup))}
    return {"network": ms.pop("network"), "inside": {n: 1000 * statistics.median(v) for n, v in inside.items()},
            "alone": ms, "shapes": {n: tuple(s) for n, s in shapes.items()}}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mobilenetv2_mini_035")
    p.add_argument("--resolution", type=int, default=28)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--show", type=int, default=5, help="layers listed per scale (largest difference first)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = build(a.backbone, num_classes=a.num_classes, in_channels=a.in_channels, resolution=a.resolution).eval()
    rule = WidthRule(model.arch, 1)
    x = torch.randn(a.batch, a.in_channels, a.resolution, a.resolution, generator=torch.Generator().manual_seed(0))
    print(f"{a.backbone} at {a.resolution} px, batch {a.batch}, {a.threads} thread(s), median of {a.rounds} rounds")
    results = []
    for scale in a.scales:
        widths = model.arch.full_widths() if scale >= 1 else rule.scaled(scale)
        r = profile(_compact_at(model, widths), x, a.rounds, a.warmup)
        inside, alone = sum(r["inside"].values()), sum(r["alone"].values())
        print(f"\nwidths x{scale:g}: network {r['network']:.2f} ms; layers inside {inside:.2f} ms, alone {alone:.2f} ms "
              f"(inside / alone {inside / alone:.2f}); outside the layers {1 - inside / r['network']:.0%} of the network")
        worst = sorted(r["inside"], key=lambda n: -abs(r["inside"][n] - r["alone"][n]))[:a.show]
        for n in worst:
            print(f"  {n:32s} input {r['shapes'][n]}: inside {r['inside'][n]:.3f} ms, alone {r['alone'][n]:.3f} ms")
        results.append({"scale": scale, **r})
    return results


if __name__ == "__main__":
    main()
