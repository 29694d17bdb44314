"""Image-to-image translation: the generator of a CycleGAN, searched, fine-tuned and measured.

The paper compresses a CycleGAN generator (Mobile-ResNet, GAN Compression's) with PaS. This is
that setting at a scale that trains on a laptop, on data the package ships:

Domains. A = contour drawings, B = silhouettes, both made from the embedded silhouettes: the
contour of an image is its morphological gradient (3x3 dilation minus 3x3 erosion), a deterministic
function with no parameter to tune. The training split is cut in two halves by a fixed permutation:
the first half is seen only as contours, the second only as silhouettes, so training is unpaired as
in CycleGAN (no generator ever sees the silhouette of a contour it translates); every validation
image gives a pair (contour, silhouette) for the metrics.

Training: CycleGAN's objective (Zhu et al., 2017) with LSGAN losses: G: A -> B (the generator PaS
searches), F: B -> A, discriminators D_A and D_B (PatchGAN);
    L_G = (D_B(G(a)) - 1)^2 + (D_A(F(b)) - 1)^2 + l_cyc (|F(G(a)) - a| + |G(F(b)) - b|)
          + l_cyc l_id (|G(b) - b| + |F(a) - a|)
    L_D = 1/2 [(D_B(b) - 1)^2 + D_B(G(a))^2] + 1/2 [(D_A(a) - 1)^2 + D_A(F(b))^2]
with Adam (betas 0.5, 0.999) on the networks, as CycleGAN. The search adds the MACs penalty of G to
L_G; G's DBC gates are trained with SGD (momentum, weight decay) at optim.lr * optim.gate_lr_scale,
as in the classification search, so that alpha and the gates' lr mean the same thing in both tasks.
Left out: CycleGAN's history pool of 50 generated images (the discriminators see the current
batch's fakes), which keeps a resumed run exactly the same as an uninterrupted one.

Metrics (validation pairs, images in [0, 1]): L1 and PSNR of G(contour) against the silhouette, and
the top-1 accuracy of the project's own classifier, trained on the silhouettes of the same training
split, on G(contour): a translation that loses the animal's shape loses the class. For reference,
the same classifier's accuracy on the true silhouettes and on the raw contours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pas.data import DataInfo, TensorData, _generator, epoch_indices
from pas.engine import Trainer
from pas.errors import PasError

ADAM_BETAS = (0.5, 0.999)  # CycleGAN's
TRANSLATION_DATASETS = ("animal_mnist", "digits")  # in-memory: their domains are built by a tensor op


def contours(images: torch.Tensor) -> torch.Tensor:
    """The morphological gradient (3x3 dilation minus 3x3 erosion) of images in [0, 1]: the outline
    of a silhouette, about two pixels wide."""
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    return dilated - eroded


@dataclass
class TranslationData:
    """Domain A (contours) and B (silhouettes) in [-1, 1]; unpaired for training, paired for val.
    `info` is the classification data's (its normalisation feeds the classifier)."""
    train_a: torch.Tensor
    train_b: torch.Tensor
    val_a: torch.Tensor
    val_b: torch.Tensor
    val_labels: torch.Tensor
    info: DataInfo

    @property
    def channels(self) -> int:
        return self.train_a.shape[1]

    @property
    def resolution(self) -> int:
        return self.train_a.shape[-1]


def _unit(data: TensorData, info: DataInfo) -> torch.Tensor:
    """Images back in [0, 1] from the dataset's normalisation."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (data.images * std + mean).clamp(0, 1)


def translation_data(train: TensorData, val: TensorData, info: DataInfo, *, split_seed: int) -> TranslationData:
    """The two domains of a classification dataset loaded without augmentation (module docstring)."""
    if not isinstance(train, TensorData) or info.name not in TRANSLATION_DATASETS:
        raise PasError(f"dataset {info.name!r} cannot give translation domains; expected one of "
                       f"{', '.join(TRANSLATION_DATASETS)} (in memory: its contours are computed)")
    if info.resolution % 4:
        raise PasError(f"images of {info.resolution}x{info.resolution} do not suit a generator; expected a side "
                       f"that is a multiple of 4 (dataset.resize)")
    if len(train) < 2:
        raise PasError(f"{len(train)} training image(s): expected at least 2, one per domain")
    x, v = _unit(train, info), _unit(val, info)
    order = torch.randperm(len(x), generator=_generator(split_seed, 7))
    half = len(x) // 2
    a, b = order[:half], order[half:2 * half]
    return TranslationData(train_a=contours(x[a]) * 2 - 1, train_b=x[b] * 2 - 1, val_a=contours(v) * 2 - 1,
                           val_b=v * 2 - 1, val_labels=val.labels, info=info)


class UnpairedLoader:
    """One epoch of (a, b) batches, each domain in its own (seed, epoch) order."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, *, batch_size: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1):
        self.a, self.b, self.batch_size = a, b, batch_size
        kw = dict(shuffle=True, epoch=epoch, rank=rank, world_size=world_size, drop_last=True)
        self.ia = epoch_indices(len(a), seed=seed * 2, **kw)
        self.ib = epoch_indices(len(b), seed=seed * 2 + 1, **kw)

    def __len__(self) -> int:
        return max(1, min(len(self.ia), len(self.ib)) // self.batch_size)

    def __iter__(self):
        bs = min(self.batch_size, len(self.ia), len(self.ib))
        for i in range(len(self)):
            yield self.a[self.ia[i * bs:(i + 1) * bs]], self.b[self.ib[i * bs:(i + 1) * bs]]


class PairedLoader:
    """Validation batches (contour, silhouette, label)."""

    def __init__(self, data: TranslationData, batch_size: int = 256):
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.data.val_a) / self.batch_size)

    def __iter__(self):
        d, bs = self.data, self.batch_size
        for i in range(len(self)):
            s = slice(i * bs, (i + 1) * bs)
            yield d.val_a[s], d.val_b[s], d.val_labels[s]


class CycleGAN(nn.Module):
    """G: A -> B (searched; carries `.arch`), F: B -> A, and the discriminators of both domains."""

    def __init__(self, g: nn.Module, f: nn.Module, d_a: nn.Module, d_b: nn.Module):
        super().__init__()
        self.g, self.f, self.d_a, self.d_b = g, f, d_a, d_b

    def forward(self, a):
        return self.g(a)


def build_cyclegan(backbone: str, *, channels: int, resolution: int) -> CycleGAN:
    """G and F are the registered generator `backbone`; the discriminators are PatchGANs with as many
    stride-2 convs as the image allows (3 at 256 px, 2 at 28 px)."""
    from pas.models import build
    from pas.models.generator import PatchDiscriminator
    g = build(backbone, num_classes=channels, in_channels=channels, resolution=resolution)
    if getattr(g.arch, "family", "") != "generator":
        raise PasError(f"backbone {backbone!r} is not an image generator; expected one of the registered "
                       f"generators (e.g. mobile_resnet_generator_mini) for task translation")
    f = build(backbone, num_classes=channels, in_channels=channels, resolution=resolution)
    layers = 3 if resolution >= 64 else 2
    filters = 64 if resolution >= 64 else 16
    return CycleGAN(g, f, PatchDiscriminator(in_channels=channels, filters=filters, layers=layers),
                    PatchDiscriminator(in_channels=channels, filters=filters, layers=layers))


def _mse_to(x: torch.Tensor, value: float) -> torch.Tensor:
    return F.mse_loss(x, torch.full_like(x, value))


@torch.no_grad()
def translation_metrics(generator: nn.Module, loader, *, classifier: nn.Module | None = None,
                        info: DataInfo | None = None) -> dict:
    """L1 and PSNR (dB, per image, averaged) of G(contour) against the silhouette in [0, 1]; with a
    classifier, its top-1 and top-5 (%) on G(contour) as `top1`, `top5`."""
    was = generator.training
    generator.eval()
    n, l1, psnr, hits, hits5 = 0, 0.0, 0.0, 0.0, 0.0
    for a, b, y in loader:
        out = (generator(a).clamp(-1, 1) + 1) / 2
        truth = (b + 1) / 2
        l1 += float((out - truth).abs().mean(dim=(1, 2, 3)).sum())
        mse = (out - truth).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnr += float((10 * torch.log10(1 / mse)).sum())
        if classifier is not None:
            top = classify(classifier, out, info).topk(5, dim=1).indices
            hits += float((top[:, 0] == y).sum())
            hits5 += float((top == y[:, None]).any(1).sum())
        n += len(a)
    generator.train(was)
    n = max(n, 1)
    row = {"val_l1": l1 / n, "psnr": psnr / n}
    if classifier is not None:
        row.update(top1=100 * hits / n, top5=100 * hits5 / n)
    return row


def classify(classifier: nn.Module, images01: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """The classifier's logits on images in [0, 1], normalised as it was trained."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return classifier((images01 - mean) / std)


@torch.no_grad()
def reference_accuracy(classifier: nn.Module, data: TranslationData) -> dict:
    """The classifier's top-1 on the true silhouettes and on the raw contours (the two ends)."""
    classifier.eval()
    y = data.val_labels
    real = classify(classifier, (data.val_b + 1) / 2, data.info).argmax(1)
    raw = classify(classifier, (data.val_a + 1) / 2, data.info).argmax(1)
    return {"top1_silhouettes": 100 * float((real == y).float().mean()),
            "top1_contours": 100 * float((raw == y).float().mean())}


class CycleGANTrainer(Trainer):
    """The engine's epochs, resume and logging, with CycleGAN's two updates per step (module docstring).
    `model` is a CycleGAN; a penalty (the search) applies to G's gates."""

    def __init__(self, model: CycleGAN, *, lambda_cycle: float = 10.0, lambda_identity: float = 0.5, **kw):
        super().__init__(model, **kw)
        self.lambda_cycle, self.lambda_identity = lambda_cycle, lambda_identity
        gates = [p for n, p in model.named_parameters() if p.requires_grad and "pas_gates" in n.split(".")]
        nets = [p for n, p in model.named_parameters()
                if p.requires_grad and "pas_gates" not in n.split(".") and n.split(".")[0] in ("g", "f")]
        discs = [p for n, p in model.named_parameters() if n.split(".")[0] in ("d_a", "d_b")]
        o = self.optim_cfg
        self.optimizers = {"generators": torch.optim.Adam(nets, lr=o.lr, betas=ADAM_BETAS),
                           "discriminators": torch.optim.Adam(discs, lr=o.lr, betas=ADAM_BETAS)}
        if gates:
            self.optimizers["gates"] = torch.optim.SGD(gates, lr=o.lr * o.gate_lr_scale, momentum=o.momentum,
                                                       weight_decay=o.weight_decay)
        self.optimizer = None

    def optimizer_state(self) -> dict:
        return {k: opt.state_dict() for k, opt in self.optimizers.items()}

    def load_optimizer_state(self, state: dict) -> None:
        if sorted(state) != sorted(self.optimizers):
            raise PasError(f"optimizers {sorted(state)} in the state, this run has {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[k])

    def validate(self) -> dict:
        return translation_metrics(self.model.g, self.val_loader)

    def _train_epoch(self, epoch: int) -> dict:
        m = self.model
        m.train()
        loader = self.train_loader(epoch)
        steps = len(loader)
        sums = {"loss": 0.0, "loss_d": 0.0, "cycle_l1": 0.0}
        n, macs, lr = 0, None, self.optim_cfg.lr
        lc, li = self.lambda_cycle, self.lambda_identity
        for step, (a, b) in enumerate(loader):
            lr = self.optim_cfg.lr_at(epoch, step, steps, self.epochs)
            for name, opt in self.optimizers.items():
                for group in opt.param_groups:
                    group["lr"] = lr * (self.optim_cfg.gate_lr_scale if name == "gates" else 1.0)
            a, b = a.to(self.world.device), b.to(self.world.device)
            fake_b, fake_a = m.g(a), m.f(b)
            for p in (*m.d_a.parameters(), *m.d_b.parameters()):
                p.requires_grad_(False)
            gan = _mse_to(m.d_b(fake_b), 1.0) + _mse_to(m.d_a(fake_a), 1.0)
            cycle = F.l1_loss(m.f(fake_b), a) + F.l1_loss(m.g(fake_a), b)
            identity = F.l1_loss(m.g(b), b) + F.l1_loss(m.f(a), a)
            loss = gan + lc * cycle + lc * li * identity
            total, macs = self.penalised(loss, epoch, step, lr, macs)
            for k in ("generators", "gates"):
                if k in self.optimizers:
                    self.optimizers[k].zero_grad(set_to_none=True)
            total.backward()
            for k in ("generators", "gates"):
                if k in self.optimizers:
                    self.optimizers[k].step()
            for p in (*m.d_a.parameters(), *m.d_b.parameters()):
                p.requires_grad_(True)
            loss_d = 0.5 * (_mse_to(m.d_b(b), 1.0) + _mse_to(m.d_b(fake_b.detach()), 0.0)) + \
                0.5 * (_mse_to(m.d_a(a), 1.0) + _mse_to(m.d_a(fake_a.detach()), 0.0))
            self.optimizers["discriminators"].zero_grad(set_to_none=True)
            loss_d.backward()
            self.optimizers["discriminators"].step()
            k = len(a)
            n += k
            sums["loss"] += float(loss.detach()) * k
            sums["loss_d"] += float(loss_d.detach()) * k
            sums["cycle_l1"] += float(cycle.detach()) * k
            if self.on_step is not None and self.world.main:
                self.on_step(epoch, step, macs)
        return self.epoch_row(sums, n, lr, macs)


SAMPLES = 8  # validation images in each model's samples.png


@torch.no_grad()
def sample_grid(generator: nn.Module, data: TranslationData, n: int = SAMPLES) -> torch.Tensor:
    """The first `n` validation images as uint8 (3 H, n W), first channel: the contours, their
    translations by `generator`, the true silhouettes, one row each."""
    def row(x):
        x = ((x[:n].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (n, C, H, W)
        return torch.cat(list(x[:, 0]), dim=1)
    generator.eval()
    return torch.cat([row(data.val_a), row(generator(data.val_a[:n])), row(data.val_b)])


def save_samples(generator: nn.Module, data: TranslationData, path) -> None:
    from PIL import Image

    from pas.io import atomic_path
    with atomic_path(path) as tmp:
        Image.fromarray(sample_grid(generator, data).numpy()).save(tmp, format="PNG")

