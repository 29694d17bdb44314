"""6. Memory: peak RSS of search steps vs plain steps, each in a fresh process (same model, batch)."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _child(backbone: str, batch: int, search: bool, steps: int) -> None:
    import torch
    from torch import nn

    from pas.gates import attach_gates
    from pas.models import build
    from pas.search import MacsPenalty
    torch.set_num_threads(1)
    model = build(backbone, num_classes=10, in_channels=1, resolution=28)
    penalty = None
    if search:
        attach_gates(model)
        penalty = MacsPenalty(model.arch, int(model.arch.macs() * 0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"baseline_kib": before, "peak_kib": peak}))


def measure(backbone: str, batch: int, search: bool, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", backbone, str(batch),
                          str(int(search)), str(steps)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        b, n, s, k = sys.argv[2:6]
        return _child(b, int(n), bool(int(s)), int(k))
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="repvgg_b1_mini")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    plain = measure(a.backbone, a.batch, False, a.steps)
    search = measure(a.backbone, a.batch, True, a.steps)
    ratio = search["peak_kib"] / plain["peak_kib"]
    step_ratio = (search["peak_kib"] - search["baseline_kib"]) / max(plain["peak_kib"] - plain["baseline_kib"], 1)
    print(f"peak RSS search {search['peak_kib'] / 1024:.0f} MiB vs plain {plain['peak_kib'] / 1024:.0f} MiB "
          f"({a.backbone}, batch {a.batch}): ratio {ratio:.3f}x; training-step growth ratio {step_ratio:.3f}x")
    return {"benchmark": "peak RSS (search / plain)", "ratio": ratio, "goal": "reported",
            "search_mib": search["peak_kib"] / 1024, "plain_mib": plain["peak_kib"] / 1024}


if __name__ == "__main__":
    main()
