"""The training engine behind pretrain, search and fine-tune: one loop, resumable per epoch.

Each epoch ends with an atomic training-state file (weights, optimizer, history); a run started
again resumes after the last complete epoch. Every epoch reseeds the RNGs from (seed, epoch) and the
loaders draw their permutation and augmentation from (seed, epoch), so on CPU a resumed run ends
with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pas.errors import PasError
from pas.io import atomic_torch_save


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of the epochs
    gamma: float = 0.1
    # Learning rate of the DBC gate weights relative to the network's (1.0: the paper's one lr).
    # A gate must travel from 1.0 to the 0.5 threshold; on a short search (few hundred steps, not
    # ImageNet's ~25,000) a larger factor lets the MACs penalty move the gates in time.
    gate_lr_scale: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise PasError(f"lr must be a positive number, got {self.lr!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise PasError(f"schedule {self.schedule!r} is unknown; expected cosine, step or constant")

    def lr_at(self, epoch: int, step: int, steps: int, epochs: int) -> float:
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":
            passed = sum(1 for m in self.milestones if epoch >= round(m * epochs))
            return self.lr * self.gamma ** passed
        t = (epoch + step / max(steps, 1)) / max(epochs, 1)
        return 0.5 * self.lr * (1 + math.cos(math.pi * t))


@dataclass
class World:
    """Where this process stands in a (possibly) distributed run."""
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Number of samples whose label is in the top-k predictions, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == target.unsqueeze(1)
    return [float(hit[:, :k].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over a loader."""
    was = model.training
    model.eval()
    n, loss, top1, top5 = 0, 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        a1, a5 = accuracy(out, y)
        top1, top5, n = top1 + a1, top5 + a5, n + len(y)
    model.train(was)
    n = max(n, 1)
    return {"val_loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


class Trainer:
    """Trains `model` for `epochs` with SGD; `penalty(model) -> (extra_loss, macs)` adds the search
    term; `on_step` records search history; `on_epoch(epoch, metrics)` logs."""

    def __init__(self, model: nn.Module, *, train_loader: Callable[[int], object], val_loader=None,
                 epochs: int, optim: OptimConfig, seed: int = 0, state_path: str | Path | None = None,
                 penalty: Callable | None = None, on_step: Callable | None = None,
                 on_epoch: Callable | None = None, world: World | None = None, amp: bool = False,
                 progress: bool = False, fingerprint: str | None = None):
        if not isinstance(epochs, int) or epochs < 0:
            raise PasError(f"epochs must be a non-negative integer, got {epochs!r}")
        self.world = world or World()
        self.model = model.to(self.world.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.optim_cfg, self.seed = epochs, optim, seed
        self.state_path = Path(state_path) if state_path else None
        self.penalty, self.on_step, self.on_epoch = penalty, on_step, on_epoch
        self.amp = amp and self.world.device.type == "cuda"
        # inputs follow the model's memory format (the stages make it channels_last on CUDA)
        first = next((p for p in model.parameters() if p.dim() == 4), None)
        self.channels_last = first is not None and self.world.device.type == "cuda" and \
            first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
        self.progress = progress
        # what the state file must have been written for (the stage's config and inputs): a state
        # left by a killed run of another config is not resumed
        self.fingerprint = fingerprint
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # DBC gates live under `pas_gates` (pas.gates.GATES_ATTR), also inside a container of networks
        is_gate = ["pas_gates" in n.split(".") for n, _ in named]
        groups = [{"params": [p for (n, p), g in zip(named, is_gate) if not g], "lr_scale": 1.0},
                  {"params": [p for (n, p), g in zip(named, is_gate) if g], "lr_scale": optim.gate_lr_scale}]
        self.optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=optim.lr,
                                         momentum=optim.momentum, weight_decay=optim.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch, self.history, self.metrics = 0, [], []
        self.net = self._wrap(model)

    def _wrap(self, model):
        if self.world.size > 1:
            ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    # -- resumable state ---------------------------------------------------------------------
    def load_state(self) -> bool:
        """Resume from the state file if one exists; True when it did."""
        if not self.state_path or not self.state_path.exists():
            return False
        try:
            state = torch.load(self.state_path, map_location=self.world.device, weights_only=True)
            written_for = state.get("fingerprint")
            if self.fingerprint and written_for and written_for != self.fingerprint:
                if self.world.main:
                    print(f"training state {str(self.state_path)!r} was written for another configuration or "
                          f"input; starting over", file=sys.stderr, flush=True)
                return False
            self.model.load_state_dict(state["model"])
            self.load_optimizer_state(state["optimizer"])
            if state.get("scaler"):  # AMP's loss scale, as it had adapted (empty when AMP was off)
                self.scaler.load_state_dict(state["scaler"])
            start, history, metrics = int(state["epoch"]), list(state["history"]), list(state["metrics"])
        except Exception as e:  # a state file we cannot use is not a reason to lose the run
            reason = " ".join(str(e).split())  # load_state_dict lists every key over several lines
            reason = f"{type(e).__name__}: {reason[:200]}{'...' if len(reason) > 200 else ''}"
            raise PasError(f"training state {str(self.state_path)!r} cannot be resumed ({reason}); "
                           f"expected the state of this same run: delete it to start over") from None
        self.start_epoch, self.history, self.metrics = start, history, metrics
        if self.world.main:
            print(f"resuming after epoch {self.start_epoch}/{self.epochs} from {self.state_path}",
                  file=sys.stderr, flush=True)
        return True

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def validate(self) -> dict:
        """The metrics of one pass over the validation data (after every epoch)."""
        return evaluate(self.model, self.val_loader, self.world.device)

    def save_state(self, epoch: int) -> None:
        if self.state_path and self.world.main:
            atomic_torch_save({"epoch": epoch, "fingerprint": self.fingerprint, "model": self.model.state_dict(),
                               "optimizer": self.optimizer_state(), "scaler": self.scaler.state_dict(),
                               "history": self.history,
                               "metrics": self.metrics}, self.state_path)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        self.load_state()
        for epoch in range(self.start_epoch, self.epochs):
            torch.manual_seed(self.seed * 100003 + epoch)
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, **self._train_epoch(epoch)}
            if self.val_loader is not None:
                row.update(self.validate())
            row["epoch_seconds"] = time.perf_counter() - t0
            self.metrics.append(row)
            self.save_state(epoch + 1)
            if self.on_epoch and self.world.main:
                self.on_epoch(epoch + 1, row)
        return self.metrics

    def _train_epoch(self, epoch: int) -> dict:
        self.net.train()
        loader = self.train_loader(epoch)
        steps = len(loader) if hasattr(loader, "__len__") else 0
        it = loader
        if self.progress and self.world.main:
            from tqdm import tqdm
            it = tqdm(loader, total=steps or None, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False)
        n, loss_sum, correct, macs = 0, 0.0, 0.0, None
        lr = self.optim_cfg.lr
        for step, (x, y) in enumerate(it):
            lr = self.optim_cfg.lr_at(epoch, step, steps, self.epochs)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x, y = x.to(self.world.device, non_blocking=True), y.to(self.world.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.world.device.type, enabled=self.amp):
                out = self.net(x)
                loss = nn.functional.cross_entropy(out, y)
            total, macs = self.penalised(loss, epoch, step, lr, macs)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += accuracy(out.detach(), y, ks=(1,))[0]
            if self.on_step is not None and self.world.main:
                self.on_step(epoch, step, macs)
        return self.epoch_row({"loss": loss_sum, "train_top1": 100 * correct}, n, lr, macs)

    def penalised(self, loss: torch.Tensor, epoch: int, step: int, lr: float, macs=None):
        """The step's loss plus the search penalty (if any) and the penalty's MACs; a one-line error
        for a loss that is not finite."""
        total = loss
        if self.penalty is not None:
            extra, macs = self.penalty(self.model)
            total = loss + extra
        if not torch.isfinite(total):
            raise PasError(f"loss became {float(total.detach())} at epoch {epoch + 1} step {step + 1} "
                           f"(lr {lr:g}); expected a finite loss: lower the learning rate")
        return total, macs

    @staticmethod
    def epoch_row(sums: dict, n: int, lr: float, macs) -> dict:
        """An epoch's logged row: every sum over its n samples averaged, the last lr and gated MACs."""
        row = {key: v / max(n, 1) for key, v in sums.items()}
        row["lr"] = lr
        if macs is not None:
            row["macs"] = float(macs.detach())
        return row


def env_world() -> World:
    """The world torchrun describes through its environment, else a single CPU/GPU process."""
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return World(rank, size, torch.device("cuda", local))
    return World(rank, size, torch.device("cpu"))
