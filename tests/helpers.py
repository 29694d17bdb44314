"""Shared test helpers."""
import torch


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN affine parameters and running statistics, so fusion is tested on real numbers."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def random_masks(widths, blocks=None, *, seed: int = 0, p: float = 0.5) -> list[torch.Tensor]:
    """Random masks with at least one channel kept; a layer of several blocks (read or written by a
    grouped conv) keeps the same random count in each block, at random positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w, b in zip(widths, blocks or [1] * len(widths)):
        if b > 1:
            n = int(torch.randint(1, w // b + 1, (1,), generator=g))
            out.append(torch.stack([torch.randperm(w // b, generator=g) < n for _ in range(b)]).flatten())
            continue
        m = torch.rand(w, generator=g) < p
        m[torch.randint(w, (1,), generator=g)] = True
        out.append(m)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def imagenet_folder(root, classes: int, train_per_class: int, val_per_class: int, *, seed: int = 0,
                    sizes=((500, 375), (375, 500), (320, 240), (256, 256), (640, 480))):
    """An ImageNet-shaped folder: root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG, RGB JPEGs of
    mixed sizes (ImageNet's are mostly 500x375 or 375x500), a class-dependent colour and texture so
    a network can tell the classes apart. Returns root."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[(c + i) % len(sizes)]
                base = np.array([(c * 67) % 256, (c * 131 + 40) % 256, (c * 29 + 90) % 256], dtype=np.float32)
                stripes = (np.arange(w)[None, :] // (8 + 4 * c)) % 2 * 60.0
                pixels = base + stripes[..., None] + rng.normal(0, 20, (h, w, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{split}_{c}_{i}.JPEG", quality=85)
    return root
