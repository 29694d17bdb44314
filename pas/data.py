"""Datasets and fast loaders.

One entry point, ``load_data(name, ...) -> (train, val, DataInfo)``, and one loader factory,
``make_loader(dataset, ...)``, for every dataset the workflow trains on:

* ``animal_mnist`` -- embedded, offline: 10,000 28x28 grayscale animal silhouettes from the
  animal-mnist 0.4 package (MIT, see ``pas/data/LICENSE.animal-mnist.txt``), stored as
  ``pas/data/animal_mnist.npz`` and checked against ``pas/data/animal_mnist.sha256`` on load.
  Exact byte-duplicate images (284 of them) are removed before the split, so no val image
  also occurs in train.
* ``digits`` -- scikit-learn's ``load_digits`` (1,797 real 8x8 images, offline).
* ``cifar10`` / ``cifar100`` -- torchvision's CIFAR from a local ``root`` (never downloaded):
  the train split is train, the test split is val.
* ``imagenet`` -- ``root/train`` and ``root/val`` as ImageFolders with the standard transforms.
* ``folder`` -- any ``root/train`` + ``root/val`` ImageFolder pair.  Every image is converted
  on load to ``in_channels`` (1: PIL mode "L", 3: "RGB"), whatever its own channel count, and
  resized to ``resize`` x ``resize`` (default: the size of the first train image, if square).

The two in-memory datasets (animal_mnist, digits) come back as :class:`TensorData`: float32
normalised tensors (normalised by the train split's per-channel mean/std, the same values
applied to val) that ``make_loader`` batches by slicing, with the train augmentation (random
translation by up to 2 pixels with black padding; plus a random horizontal flip for
animal_mnist) done batched on tensors.  The splits are stratified and drawn from
``numpy.random.default_rng(seed)``, so they are the same on every machine.

Every random choice of a loader (permutation, augmentation) comes from generators seeded by
``(seed, epoch)``, so a run is reproducible and a resumed epoch gives the same batches.
Errors a user can cause are raised as one-line :class:`pas.errors.PasError`.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pas.errors import PasError

__all__ = [
    "DATASETS", "DataInfo", "TensorData", "load_data", "make_loader", "load_animal_mnist",
    "dedup_images", "stratified_split", "stratified_subset", "epoch_indices",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
ANIMAL_MNIST_NPZ = DATA_DIR / "animal_mnist.npz"
ANIMAL_MNIST_SHA256 = DATA_DIR / "animal_mnist.sha256"
# Label order 0..9: the package's README lists the classes in this (alphabetical) order and the
# labels are stored sorted, 1,000 per class.
ANIMAL_MNIST_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]

DATASETS = ("animal_mnist", "digits", "cifar10", "cifar100", "imagenet", "folder")

SHIFT_PIXELS = 2  # in-memory train augmentation: random translation by up to this many pixels
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class DataInfo:
    name: str
    in_channels: int
    num_classes: int
    resolution: int
    train_size: int
    val_size: int
    classes: list[str]
    mean: tuple[float, ...] = ()       # per-channel normalisation applied to both splits
    std: tuple[float, ...] = ()
    duplicates_removed: int = 0        # exact byte-duplicate images dropped before the split
    skipped: int = 0                   # unreadable image files dropped (load_data's `exclude`)


# ----------------------------------------------------------------------------- seeding

def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, ...), stable across machines and versions."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_mix_seed(*parts))
    return g


# ----------------------------------------------------------------------------- split helpers

def dedup_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Indices (ascending) of the first occurrence of every distinct image, by exact bytes.

    Returns ``(keep, removed, conflicting_groups)``; a conflicting group is a set of identical
    images with more than one label (the first occurrence's label is kept).
    """
    n = len(images)
    flat = np.ascontiguousarray(images.reshape(n, -1))
    keys = flat.view(np.dtype((np.void, flat.shape[1] * flat.itemsize))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    conflicting = labels != labels[first[inverse]]
    groups = len(np.unique(inverse[conflicting]))
    return np.sort(first), n - len(first), groups


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class (ascending), round(val_fraction * count) to val."""
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise PasError(f"val_fraction {val_fraction!r} is out of range: expected a number strictly between 0 and 1")
    rng = np.random.default_rng(_check_seed(seed))
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = math.floor(val_fraction * len(idx) + 0.5)
        n_val = min(n_val, len(idx) - 1) if len(idx) > 1 else n_val
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise PasError(f"val_fraction {val_fraction} leaves an empty split of {len(labels)} images: "
                       "expected a fraction giving at least one train and one val image")
    return train_idx, val_idx


def stratified_subset(labels: np.ndarray, n: int, seed: int | list[int]) -> np.ndarray:
    """Positions (ascending) of a deterministic stratified subset of ``n`` items of ``labels``.

    Per-class quotas are proportional to class counts (largest remainder); all of ``labels``
    if ``n >= len(labels)``.
    """
    total = len(labels)
    if n >= total:
        return np.arange(total)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / total
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PasError(f"seed {seed!r} is invalid: expected a non-negative integer")
    return int(seed)


def _check_positive(name: str, value, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PasError(f"{name} {value!r} is invalid: expected a positive integer")


# ----------------------------------------------------------------------------- in-memory data

class TensorData:
    """An in-memory dataset: float32 images (N, C, H, W), int64 labels (N,).

    ``shift``/``flip`` describe the batched train augmentation ``make_loader`` applies (none
    for val); ``fill`` is the per-channel value used for padding when shifting (the normalised
    value of a black pixel).  Indexing gives ``(image, label)`` like any map-style dataset.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, shift: int = 0, flip: bool = False,
                 fill: torch.Tensor | float = 0.0):
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise PasError(f"TensorData got images {tuple(images.shape)} and labels {tuple(labels.shape)}: "
                           "expected (N, C, H, W) and (N,)")
        self.images = images.to(torch.float32).contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.shift = int(shift)
        self.flip = bool(flip)
        c = self.images.shape[1]
        self.fill = torch.as_tensor(fill, dtype=torch.float32).expand(c).clone()

    @property
    def augmented(self) -> bool:
        return self.shift > 0 or self.flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def augment_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random per-sample translation (padding with ``fill``) and horizontal flip, batched."""
        b, c, h, w = x.shape
        offsets = torch.randint(0, 2 * self.shift + 1, (2, b), generator=generator)
        flips = torch.rand(b, generator=generator) < 0.5
        if self.shift:
            s = self.shift
            hp, wp = h + 2 * s, w + 2 * s
            padded = self.fill.view(1, c, 1, 1).expand(b, c, hp, wp).clone()
            padded[:, :, s:s + h, s:s + w] = x
            rows = offsets[0, :, None] + torch.arange(h)                    # (B, H)
            cols = offsets[1, :, None] + torch.arange(w)                    # (B, W)
            lin = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
            x = padded.view(b, c, hp * wp).gather(2, lin).view(b, c, h, w)
        if self.flip:
            x = torch.where(flips.view(b, 1, 1, 1), x.flip(3), x)
        return x


def _read_expected_sha256() -> str:
    try:
        return ANIMAL_MNIST_SHA256.read_text().split()[0].lower()
    except (OSError, IndexError):
        raise PasError(f"checksum file {ANIMAL_MNIST_SHA256} is missing or empty: expected the sha256 "
                       "of animal_mnist.npz (reinstall pas)") from None


def load_animal_mnist(path: str | Path | None = None, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The embedded animal-mnist arrays ``(images uint8 (N,28,28), labels int64 (N,))``, checksum-verified.

    ``path`` defaults to the packaged ``animal_mnist.npz``; ``sha256`` defaults to the packaged
    ``animal_mnist.sha256``.
    """
    path = Path(ANIMAL_MNIST_NPZ if path is None else path)
    expected = (sha256 or _read_expected_sha256()).lower()
    try:
        raw = path.read_bytes()
    except OSError:
        raise PasError(f"embedded dataset {path} is missing: expected the packaged animal_mnist.npz "
                       "(reinstall pas)") from None
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise PasError(f"embedded dataset {path} has sha256 {actual}: expected {expected} "
                       "(the file is corrupt or was modified; reinstall pas)")
    import io
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != (len(images),):
        raise PasError(f"embedded dataset {path} holds images {images.shape} {images.dtype} and labels "
                       f"{labels.shape}: expected uint8 (N,28,28) and (N,)")
    return images, labels


def _in_memory(name: str, images: np.ndarray, scale: float, labels: np.ndarray, classes: list[str], *,
               flip: bool, val_fraction: float, seed: int, resize: int | None, augment: bool,
               max_train: int | None, max_val: int | None) -> tuple[TensorData, TensorData, DataInfo]:
    keep, removed, conflicts = dedup_images(images, labels)
    if conflicts:
        warnings.warn(f"{name}: {conflicts} groups of identical images carry different labels; "
                      "kept the first occurrence's label", stacklevel=3)
    images, labels = images[keep], labels[keep]
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if max_train is not None:
        train_sub = train_idx[stratified_subset(labels[train_idx], max_train, [seed, 1])]
    else:
        train_sub = train_idx
    if max_val is not None:
        val_idx = val_idx[stratified_subset(labels[val_idx], max_val, [seed, 2])]

    x = torch.from_numpy(images).to(torch.float32).div_(scale).unsqueeze(1)
    resolution = x.shape[-1]
    if resize is not None and resize != resolution:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True, align_corners=False)
        resolution = resize
    # statistics of the whole train split (not of a max_train subset), applied to both splits
    xt = x[torch.from_numpy(train_idx)].double()
    mean = xt.mean(dim=(0, 2, 3)).float()
    std = xt.std(dim=(0, 2, 3), unbiased=False).float().clamp_min(1e-6)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    y = torch.from_numpy(labels)
    fill = -mean / std
    tr, va = torch.from_numpy(train_sub), torch.from_numpy(val_idx)
    train = TensorData(x[tr], y[tr], shift=SHIFT_PIXELS if augment else 0, flip=flip and augment, fill=fill)
    val = TensorData(x[va], y[va], fill=fill)
    info = DataInfo(name=name, in_channels=1, num_classes=len(classes), resolution=int(resolution),
                    train_size=len(train), val_size=len(val), classes=list(classes),
                    mean=tuple(mean.tolist()), std=tuple(std.tolist()), duplicates_removed=removed)
    return train, val, info


# ----------------------------------------------------------------------------- image folders

class _ImageLoader:
    """ImageFolder loader: decode fully, convert to ``mode``; a file PIL cannot read is a PasError."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, path: str):
        from PIL import Image, UnidentifiedImageError
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img.load()
                return img.convert(self.mode)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise PasError(f"cannot read image {path} ({reason}): expected a valid image file") from None


def _image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return IMG_EXTENSIONS


def _has_image(folder: Path, extensions: tuple[str, ...]) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(extensions) for f in files):
            return True
    return False


def _require_root(name: str, root) -> Path:
    if root is None:
        raise PasError(f"dataset {name!r} needs a root folder: expected root=PATH")
    path = Path(root)
    if not path.is_dir():
        raise PasError(f"dataset root {path} does not exist: expected a folder for dataset {name!r}")
    return path


def _check_image_root(name: str, root) -> tuple[Path, list[str]]:
    """Check root/train and root/val hold the same non-empty class folders; return the classes."""
    root = _require_root(name, root)
    extensions = _image_extensions()
    found = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise PasError(f"{root / split} not found: expected {root} to hold train/ and val/ folders of "
                           "class folders")
    for split in ("train", "val"):
        folder = root / split
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if not classes:
            raise PasError(f"{folder} has no class folders: expected one sub-folder of images per class")
        for c in classes:
            if not _has_image(folder / c, extensions):
                raise PasError(f"class folder {folder / c} is empty: expected at least one image "
                               f"({', '.join(extensions)})")
        found[split] = classes
    if found["train"] != found["val"]:
        missing = sorted(set(found["train"]) - set(found["val"]))
        extra = sorted(set(found["val"]) - set(found["train"]))
        raise PasError(f"{root / 'val'} has different class folders from {root / 'train'} "
                       f"(missing {missing}, extra {extra}): expected the same classes")
    return root, found["train"]


def _drop_files(dataset, root: Path, exclude: frozenset[str]) -> int:
    """Remove the samples whose path relative to ``root`` is in ``exclude``; how many were removed."""
    if not exclude:
        return 0
    keep = [(p, t) for p, t in dataset.samples if os.path.relpath(p, root) not in exclude]
    removed = len(dataset.samples) - len(keep)
    dataset.samples = dataset.imgs = keep
    dataset.targets = [t for _, t in keep]
    if not keep:
        raise PasError(f"every image of {dataset.root} is listed as unreadable: expected at least one readable "
                       "image per split")
    return removed


def _subsets(train, val, max_train, max_val, seed):
    from torch.utils.data import Subset
    if max_train is not None and max_train < len(train):
        train = Subset(train, stratified_subset(np.asarray(train.targets), max_train, [seed, 1]).tolist())
    if max_val is not None and max_val < len(val):
        val = Subset(val, stratified_subset(np.asarray(val.targets), max_val, [seed, 2]).tolist())
    return train, val


def _load_imagenet(root, *, resize, augment, in_channels, exclude):
    from torchvision import datasets, transforms as T
    root, classes = _check_image_root("imagenet", root)
    r = resize or 224
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    val_tf = T.Compose([T.Resize(int(r * 256 / 224)), T.CenterCrop(r), T.ToTensor(), normalize])
    train_tf = T.Compose([T.RandomResizedCrop(r), T.RandomHorizontalFlip(), T.ToTensor(), normalize]) \
        if augment else val_tf
    loader = _ImageLoader("RGB")
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf, loader=loader)
    val = datasets.ImageFolder(str(root / "val"), transform=val_tf, loader=loader)
    skipped = _drop_files(train, root, exclude) + _drop_files(val, root, exclude)
    return train, val, classes, 3, r, IMAGENET_MEAN, IMAGENET_STD, skipped


def _load_folder(root, *, resize, augment, in_channels, exclude):
    from torchvision import datasets, transforms as T
    root, classes = _check_image_root("folder", root)
    c = 3 if in_channels is None else in_channels
    if c not in (1, 3):
        raise PasError(f"in_channels {in_channels!r} is not supported for 'folder': expected 1 (grayscale) or 3 (RGB)")
    loader = _ImageLoader("L" if c == 1 else "RGB")
    train_raw = datasets.ImageFolder(str(root / "train"), loader=loader)
    _drop_files(train_raw, root, exclude)
    if resize is None:
        path = train_raw.samples[0][0]
        w, h = loader(path).size
        if w != h:
            raise PasError(f"first train image {path} is {w}x{h}: expected square images, or pass resize=N")
        resize = w
    mean, std = (0.5,) * c, (0.5,) * c
    base = [T.Resize((resize, resize))]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    pad = max(1, round(resize / 14))  # 2 pixels at 28x28, like the in-memory datasets
    train_tf = T.Compose(base + ([T.RandomCrop(resize, padding=pad)] if augment else []) + tail)
    val_tf = T.Compose(base + tail)
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf, loader=loader)
    val = datasets.ImageFolder(str(root / "val"), transform=val_tf, loader=loader)
    skipped = _drop_files(train, root, exclude) + _drop_files(val, root, exclude)
    return train, val, classes, c, resize, mean, std, skipped


def _load_cifar(name, root, *, resize, augment, in_channels):
    from torchvision import datasets, transforms as T
    root = _require_root(name, root)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    r = resize or 32
    mean, std = CIFAR_STATS[name]
    base = [T.Resize(r)] if r != 32 else []
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    aug = [T.RandomCrop(r, padding=r // 8), T.RandomHorizontalFlip()] if augment else []
    try:
        train = cls(str(root), train=True, download=False, transform=T.Compose(base + aug + tail))
        val = cls(str(root), train=False, download=False, transform=T.Compose(base + tail))
    except RuntimeError:
        raise PasError(f"{name} not found under {root}: expected {root / cls.base_folder} holding the "
                       "python-version batches, intact (nothing is downloaded)") from None
    return train, val, list(train.classes), 3, r, mean, std, 0


# ----------------------------------------------------------------------------- entry point

def load_data(name: str, *, root: str | None = None, val_fraction: float = 0.2, seed: int = 0,
              resize: int | None = None, augment: bool = True, max_train: int | None = None,
              max_val: int | None = None, in_channels: int | None = None, exclude=()):
    """Return ``(train, val, info)`` for dataset ``name`` (one of :data:`DATASETS`).

    ``root`` is the data folder of cifar10/cifar100/imagenet/folder (ignored by the embedded
    animal_mnist and digits); ``val_fraction``/``seed`` choose the stratified split of
    animal_mnist and digits (the other datasets have fixed splits); ``resize`` gives resize x resize images; ``augment=False``
    turns off train augmentation (val is never augmented); ``max_train``/``max_val`` take
    deterministic stratified subsets after the split; ``in_channels`` is the channel count
    a ``folder`` dataset is converted to (default 3) and, for the other datasets, must match
    theirs if given.  ``exclude`` (imagenet, folder): files to drop, as paths relative to ``root``
    (``train/cls/x.jpg``), e.g. the unreadable files a ``pas check-data`` report lists
    (:func:`pas.datacheck.report_exclusions`); ``info.skipped`` says how many were dropped.
    """
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise PasError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    _check_seed(seed)
    _check_positive("resize", resize)
    _check_positive("max_train", max_train)
    _check_positive("max_val", max_val)
    native = {"animal_mnist": 1, "digits": 1, "cifar10": 3, "cifar100": 3, "imagenet": 3}.get(key)
    if in_channels is not None and native is not None and in_channels != native:
        raise PasError(f"in_channels {in_channels!r} does not fit dataset {key!r}: expected {native}")

    common = dict(val_fraction=val_fraction, seed=seed, resize=resize, augment=augment,
                  max_train=max_train, max_val=max_val)
    if key == "animal_mnist":
        images, labels = load_animal_mnist()
        return _in_memory(key, images, 255.0, labels, ANIMAL_MNIST_CLASSES, flip=True, **common)
    if key == "digits":
        from sklearn.datasets import load_digits
        bunch = load_digits()
        images = bunch.images.astype(np.uint8)  # integer values 0..16
        labels = bunch.target.astype(np.int64)
        return _in_memory(key, images, 16.0, labels, [str(t) for t in bunch.target_names], flip=False, **common)

    exclude = frozenset(os.path.normpath(p) for p in exclude)
    if key in ("cifar10", "cifar100"):
        out = _load_cifar(key, root, resize=resize, augment=augment, in_channels=in_channels)
    elif key == "imagenet":
        out = _load_imagenet(root, resize=resize, augment=augment, in_channels=in_channels, exclude=exclude)
    else:
        out = _load_folder(root, resize=resize, augment=augment, in_channels=in_channels, exclude=exclude)
    train, val, classes, channels, resolution, mean, std, skipped = out
    train, val = _subsets(train, val, max_train, max_val, seed)
    info = DataInfo(name=key, in_channels=channels, num_classes=len(classes), resolution=int(resolution),
                    train_size=len(train), val_size=len(val), classes=list(classes),
                    mean=tuple(mean), std=tuple(std), skipped=skipped)
    return train, val, info


# ----------------------------------------------------------------------------- loaders

def epoch_indices(n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                  world_size: int = 1, drop_last: bool = False) -> torch.Tensor:
    """This rank's item order for one epoch: a (seed, epoch) permutation (or 0..n-1), sharded.

    With ``world_size > 1`` the ranks take every ``world_size``-th item of the same order, which
    is first padded by wrapping around (or, with ``drop_last``, truncated) to a multiple of
    ``world_size``, so every rank gets the same number of items, like DistributedSampler.
    """
    order = torch.randperm(n, generator=_generator(seed, epoch)) if shuffle else torch.arange(n)
    if world_size > 1:
        if drop_last:
            order = order[: n // world_size * world_size]
        else:
            total = math.ceil(n / world_size) * world_size
            if total > n:
                order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        order = order[rank::world_size]
    return order


class TensorLoader:
    """Batches of a :class:`TensorData` by index slicing; batched augmentation if it has any."""

    def __init__(self, dataset: TensorData, *, batch_size: int, shuffle: bool, seed: int, epoch: int,
                 drop_last: bool, rank: int, world_size: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.indices = epoch_indices(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                                     world_size=world_size, drop_last=drop_last)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self.dataset
        generator = _generator(self.seed, self.epoch, self.rank, 1) if data.augmented else None
        for b in range(len(self)):
            idx = self.indices[b * self.batch_size:(b + 1) * self.batch_size]
            x = data.images.index_select(0, idx)
            if generator is not None:
                x = data.augment_batch(x, generator)
            yield x, data.labels.index_select(0, idx)


class TorchLoader:
    """A DataLoader made afresh per iteration, so the same (seed, epoch) gives the same order."""

    def __init__(self, dataset, *, batch_size: int, shuffle: bool, seed: int, epoch: int, drop_last: bool,
                 rank: int, world_size: int, num_workers: int):
        self.dataset = dataset
        self.kw = dict(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last,
                       rank=rank, world_size=world_size, num_workers=num_workers)
        self._len = len(self._loader())

    def _loader(self):
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
        k = self.kw
        if k["world_size"] > 1:
            sampler = DistributedSampler(self.dataset, num_replicas=k["world_size"], rank=k["rank"],
                                         shuffle=k["shuffle"], seed=k["seed"], drop_last=k["drop_last"])
            sampler.set_epoch(k["epoch"])
        elif k["shuffle"]:
            sampler = RandomSampler(self.dataset, generator=_generator(k["seed"], k["epoch"]))
        else:
            sampler = SequentialSampler(self.dataset)
        # the loader's generator seeds the workers' RNGs, and so the random transforms in them
        return DataLoader(self.dataset, batch_size=k["batch_size"], sampler=sampler, drop_last=k["drop_last"],
                          num_workers=k["num_workers"], generator=_generator(k["seed"], k["epoch"], k["rank"], 1))

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        try:
            yield from self._loader()
        except PasError as e:  # from a worker it arrives wrapped in a traceback: keep its last line
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
            prefix = f"{PasError.__module__}.{PasError.__qualname__}: "
            raise PasError(last[len(prefix):] if last.startswith(prefix) else last) from None


def make_loader(dataset, *, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1, num_workers: int = 0):
    """An iterable of ``(images, labels)`` batches over ``dataset`` for one epoch.

    For :class:`TensorData` the batches are index slices with batched augmentation (no
    per-item work; ``num_workers`` is ignored); for other datasets a ``torch.utils.data``
    DataLoader with a seeded RandomSampler, or a DistributedSampler when ``world_size > 1``.
    Order and augmentation are seeded by ``(seed, epoch)``.  Iterating the same loader twice
    gives the same batches.  With ``num_workers=0`` the torchvision transforms of a non-tensor
    dataset draw from torch's global RNG.
    """
    _check_positive("batch_size", batch_size, allow_none=False)
    _check_positive("world_size", world_size, allow_none=False)
    _check_seed(seed)
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise PasError(f"epoch {epoch!r} is invalid: expected a non-negative integer")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise PasError(f"rank {rank!r} is out of range: expected 0 <= rank < world_size ({world_size})")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise PasError(f"num_workers {num_workers!r} is invalid: expected a non-negative integer")
    if len(dataset) == 0:
        raise PasError("dataset is empty: expected at least one item to load")
    kw = dict(batch_size=int(batch_size), shuffle=bool(shuffle), seed=int(seed), epoch=int(epoch),
              drop_last=bool(drop_last), rank=int(rank), world_size=int(world_size))
    if isinstance(dataset, TensorData):
        return TensorLoader(dataset, **kw)
    return TorchLoader(dataset, num_workers=int(num_workers), **kw)
