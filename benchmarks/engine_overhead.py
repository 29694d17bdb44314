"""5. Engine overhead: one `pas` training epoch (Trainer) vs a bare PyTorch loop, same model and data."""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from benchmarks.common import interleaved, verdict
from pas.data import load_data, make_loader
from pas.engine import OptimConfig, Trainer
from pas.models import build


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="repvgg_a0_mini")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, _, info = load_data("animal_mnist", max_train=a.max_train)
    base = build(a.backbone, num_classes=info.num_classes, in_channels=1, resolution=info.resolution)

    def loader(epoch):
        return make_loader(train, batch_size=a.batch, shuffle=True, epoch=epoch, drop_last=True)

    def bare():
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        for x, y in loader(0):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def engine():
        Trainer(copy.deepcopy(base), train_loader=loader, epochs=1, optim=OptimConfig(lr=0.1)).fit()

    t_bare, t_engine, ratio = interleaved(bare, engine, repeats=a.repeats, warmup=1)
    print(f"pas epoch {t_engine:.2f} s vs bare loop {t_bare:.2f} s ({a.backbone}, {len(train)} images, "
          f"batch {a.batch}): ratio {ratio:.3f}x, {verdict(ratio, 1.05, at_most=True)}")
    return {"benchmark": "engine overhead", "ratio": ratio, "goal": "<= 1.05", "engine_s": t_engine, "bare_s": t_bare}


if __name__ == "__main__":
    main()
