"""1. Search overhead: one search step (gates + MACs term) vs one plain training step."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.common import interleaved, verdict
from pas.gates import attach_gates
from pas.models import build
from pas.search import MacsPenalty


def step_fn(model, x, y, penalty=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="repvgg_b1_mini")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    kw = dict(num_classes=10, in_channels=1, resolution=28)
    plain, gated = build(a.backbone, **kw), build(a.backbone, **kw)
    gated.load_state_dict(plain.state_dict())
    attach_gates(gated)
    penalty = MacsPenalty(gated.arch, int(gated.arch.macs() * 0.5))
    x, y = torch.randn(a.batch, 1, 28, 28), torch.randint(0, 10, (a.batch,))
    t_plain, t_search, ratio = interleaved(step_fn(plain, x, y), step_fn(gated, x, y, penalty), repeats=a.repeats)
    print(f"search step {t_search * 1e3:.1f} ms vs plain step {t_plain * 1e3:.1f} ms "
          f"({a.backbone}, batch {a.batch}, {a.threads} threads): ratio {ratio:.3f}x, {verdict(ratio, 1.10, at_most=True)}")
    return {"benchmark": "search overhead", "ratio": ratio, "goal": "<= 1.10", "plain_ms": t_plain * 1e3,
            "search_ms": t_search * 1e3}


if __name__ == "__main__":
    main()
