"""3. Fusion speed-up: fused plain network vs multi-branch network, CPU inference throughput."""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, verdict
from pas.models import build
from pas.reparam import reparameterize


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="repvgg_b1_mini")
    p.add_argument("--resolution", type=int, default=28)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = build(a.backbone, num_classes=10, in_channels=a.in_channels, resolution=a.resolution).eval()
    fused = reparameterize(model).eval()
    out = []
    for b in a.batches:
        x = torch.randn(b, a.in_channels, a.resolution, a.resolution)
        with torch.inference_mode():
            t_multi, t_fused, ratio = interleaved(lambda: model(x), lambda: fused(x), repeats=a.repeats)
        speedup = 1 / ratio
        goal = verdict(speedup, 1.4, at_most=False) if b >= 64 else "reported as measured"
        print(f"fused vs multi-branch, {a.backbone} at {a.resolution}px, batch {b}: "
              f"{b / t_fused:.0f} vs {b / t_multi:.0f} img/s, speed-up {speedup:.2f}x, {goal}")
        out.append({"benchmark": f"fusion speed-up (batch {b})", "ratio": speedup,
                    "goal": ">= 1.4" if b >= 64 else "-", "fused_img_s": b / t_fused, "multi_img_s": b / t_multi})
    return out


if __name__ == "__main__":
    main()
