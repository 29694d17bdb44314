"""RepVGG-B1 searched widths against RepVGG-A0/A1/B0 at the paper's scale (224 px), as deployed:
are the networks of equal MACs equally fast, does aligning the widths to 8 channels help, and how much
of the MACs reduction from B1 turns into speed (pruning efficiency) at this scale?

Latency depends on the architecture, not on trained weights, so no training is needed. Networks:
  - RepVGG-A0, A1, B0 (the family members whose MACs PaS-A/B/C match);
  - B1 at the A0/A1/B0 budgets with uniform widths, channel_multiple 1 and 8;
  - B1 with the widths the authors' snapshot published (~2.10 G conv MACs: pas-method.md), as
    published and landed on multiples of 8 at the same MACs (the fewest channels moved).
  - RepVGG-B1 itself, the network every B1 row is pruned from.
Every network is deployed (fused plain convs), exported to ONNX and timed with ONNX Runtime on the
CPU (and PyTorch), at batch 1 and 32, all side by side in one process, rounds alternating between
the networks (`pas.latency`). Prints one table: MACs, latency, the latency relative to the family
member of about the same MACs (`vs_member`), and each pruned B1's pruning efficiency: its speed-up
over B1 divided by its MACs reduction (`efficiency`, 1 when latency falls as fast as the MACs).

    python -m benchmarks.aligned_widths [--threads 2] [--rounds 5] [--batches 1 32] [--out rows.csv]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch

from pas.deploy import save_deployed
from pas.landing import land
from pas.latency import measure
from pas.models import arch_for, build, build_deployed
from pas.pruners import uniform_masks

# pas-method.md, "Searched widths published in the snapshot": RepVGG-B1 at 224, ~2.10 G conv MACs
SNAPSHOT_2_10G = [8, 20, 16, 15, 10, 49, 41, 36, 34, 39, 31,
                  125, 107, 102, 97, 106, 123, 127, 170, 196, 202, 232, 269, 315, 425, 475, 450, 2048]
FAMILY = ("repvgg_a0", "repvgg_a1", "repvgg_b0")
BACKBONE = "repvgg_b1"


def deployed_b1(widths: list[int], folder: Path) -> Path:
    net = arch_for("repvgg_b1").with_widths(widths)
    save_deployed(build_deployed(net).eval(), folder)
    return folder


def deployed_member(name: str, folder: Path) -> Path:
    save_deployed(build_deployed(arch_for(name)).eval(), folder)
    return folder


def uniform_b1_widths(b1: torch.nn.Module, target: int, multiple: int) -> list[int]:
    landing = uniform_masks(b1, target, channel_multiple=multiple)
    return [int(m.sum()) for m in landing.masks]


def aligned(widths: list[int], multiple: int) -> list[int]:
    """The published widths on multiples of `multiple` at (within 1% of) their own MACs: the landing
    from masks that keep the first w channels (scores: kept 1, dropped 0), moving the fewest."""
    arch = arch_for("repvgg_b1")
    masks = [torch.arange(f) < w for f, w in zip(arch.full_widths(), widths)]
    target = int(arch.macs(widths))
    landing = land(arch, masks, [m.float() for m in masks], target, channel_multiple=multiple)
    return [int(m.sum()) for m in landing.masks]


def networks(root: Path) -> dict[str, tuple[Path, int, str]]:
    """name -> (deployed folder, MACs, the family member it is compared with)."""
    out = {BACKBONE: (deployed_member(BACKBONE, root / BACKBONE), int(arch_for(BACKBONE).macs()), BACKBONE)}
    for name in FAMILY:
        out[name] = (deployed_member(name, root / name), int(arch_for(name).macs()), name)
    b1 = build("repvgg_b1").eval()
    for name in FAMILY:
        target = int(arch_for(name).macs())
        for multiple in (1, 8):
            widths = uniform_b1_widths(b1, target, multiple)
            key = f"B1 uniform @{name[-2:].upper()} x{multiple}"
            out[key] = (deployed_b1(widths, root / key.replace(" ", "_").replace("@", "")),
                        int(arch_for("repvgg_b1").macs(widths)), name)
    for multiple, widths in ((1, SNAPSHOT_2_10G), (8, aligned(SNAPSHOT_2_10G, 8))):
        key = f"B1 snapshot 2.10G x{multiple}"
        out[key] = (deployed_b1(widths, root / key.replace(" ", "_")), int(arch_for("repvgg_b1").macs(widths)),
                    "repvgg_a1")
    return out


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", "--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "pytorch"])
    p.add_argument("--out", help="also write every measurement as CSV")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        nets = networks(Path(tmp))
        result = measure({k: v[0] for k, v in nets.items()}, batch_sizes=a.batches, rounds=a.rounds,
                         warmup=a.warmup, threads=a.threads, runtimes=a.runtimes)
    rows = pd.DataFrame(result["rows"])
    rows["macs_G"] = rows["model"].map(lambda k: nets[k][1] / 1e9)
    rows["member"] = rows["model"].map(lambda k: nets[k][2])
    member_ms = rows.set_index(["model", "runtime", "batch"])["latency_ms"]
    rows["vs_member"] = [ms / member_ms[(m, rt, b)] for ms, m, rt, b in
                         zip(rows["latency_ms"], rows["member"], rows["runtime"], rows["batch"])]
    b1_ms = {(rt, b): ms for m, rt, b, ms in zip(rows["model"], rows["runtime"], rows["batch"], rows["latency_ms"])
             if m == BACKBONE}
    b1_macs = nets[BACKBONE][1] / 1e9
    rows["efficiency"] = [(b1_ms[(rt, b)] / ms) / (b1_macs / g) if m.startswith("B1 ") else float("nan")
                          for m, rt, b, ms, g in zip(rows["model"], rows["runtime"], rows["batch"],
                                                     rows["latency_ms"], rows["macs_G"])]
    print(f"machine: {result['machine']['cpu']}, {a.threads} threads; {a.rounds} rounds (median)")
    for value in ("latency_ms", "vs_member", "efficiency"):
        table = rows.set_index(["model", "macs_G", "member", "runtime", "batch"])[value].unstack(["runtime", "batch"])
        print(f"\n{value}\n{table.round(3).to_markdown()}")
    if a.out:
        from pas.io import atomic_write_text
        atomic_write_text(a.out, rows.to_csv(index=False))
    return rows


if __name__ == "__main__":
    main()
