"""pas.data: embedded animal-mnist, splits without duplicates, fast seeded loaders, clear errors."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

import pas.data as data
from pas.data import (DATASETS, TensorData, dedup_images, epoch_indices, load_animal_mnist, load_data,
                      make_loader, stratified_split)
from pas.errors import PasError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def raw():
    return load_animal_mnist()


@pytest.fixture(scope="module")
def animal():
    return load_data("animal_mnist", val_fraction=0.2, seed=0, augment=False)


def _row_bytes(t: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in t.reshape(len(t), -1).numpy()}


# ----------------------------------------------------------------------------- embedded data

def test_animal_mnist_raw_shape_classes_balance(raw):
    images, labels = raw
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    assert data.ANIMAL_MNIST_CLASSES == ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe",
                                         "Horse", "Sheep", "Zebra"]
    assert images.max() == 255 and images.min() == 0


def test_checksum_mismatch_is_pas_error(tmp_path, monkeypatch):
    copy = tmp_path / "animal_mnist.npz"
    shutil.copyfile(data.ANIMAL_MNIST_NPZ, copy)
    images, _ = load_animal_mnist(copy)            # an intact copy loads
    assert images.shape == (10000, 28, 28)
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(PasError, match=r"sha256 .*expected [0-9a-f]{64}") as e:
        load_animal_mnist(copy)
    assert str(copy) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(data, "ANIMAL_MNIST_NPZ", copy)
    with pytest.raises(PasError, match="sha256"):
        load_data("animal_mnist")
    monkeypatch.setattr(data, "ANIMAL_MNIST_NPZ", tmp_path / "gone.npz")
    with pytest.raises(PasError, match="gone.npz is missing"):
        load_data("animal_mnist")


# ----------------------------------------------------------------------------- split

def test_dedup_counts(raw, animal):
    images, labels = raw
    keep, removed, conflicts = dedup_images(images, labels)
    assert removed == 284 and conflicts == 0 and len(keep) == 9716
    assert len(_row_bytes(torch.from_numpy(images[keep]))) == 9716     # what is kept is distinct
    train, val, info = animal
    assert info.duplicates_removed == 284
    assert (info.train_size, info.val_size) == (len(train), len(val)) == (7775, 1941)


def test_split_disjoint_no_shared_image_bytes(raw, animal):
    images, labels = raw
    keep, _, _ = dedup_images(images, labels)
    tr, va = stratified_split(labels[keep], 0.2, 0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(keep)
    assert not _row_bytes(torch.from_numpy(images[keep][tr])) & _row_bytes(torch.from_numpy(images[keep][va]))
    train, val, _ = animal     # the normalised tensors too: no identical image on both sides
    assert not _row_bytes(train.images) & _row_bytes(val.images)


@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_split_is_stratified(fraction):
    train, val, info = load_data("animal_mnist", val_fraction=fraction, augment=False)
    tr = np.bincount(train.labels.numpy(), minlength=10)
    va = np.bincount(val.labels.numpy(), minlength=10)
    assert np.all(np.abs(va - fraction * (tr + va)) <= 1)
    assert (tr + va).sum() == 9716 and info.num_classes == 10


def test_normalised_with_train_statistics(animal):
    train, val, info = animal
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.shape[1:] == (1, 28, 28)
    assert abs(train.images.mean().item()) < 1e-4 and abs(train.images.std().item() - 1) < 1e-3
    assert abs(val.images.mean().item()) < 0.05          # same transform, not its own statistics
    assert 0.2 < info.mean[0] < 0.35 and 0.35 < info.std[0] < 0.45


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_split_and_batches_other_epoch_other_order():
    a_train, a_val, _ = load_data("animal_mnist", seed=3)
    b_train, b_val, _ = load_data("animal_mnist", seed=3)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_val.labels, b_val.labels)
    xa, ya = next(iter(make_loader(a_train, batch_size=64, shuffle=True, seed=3, epoch=5)))
    xb, yb = next(iter(make_loader(b_train, batch_size=64, shuffle=True, seed=3, epoch=5)))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader = make_loader(a_train, batch_size=500, shuffle=True, seed=3, epoch=5)
    first, second = list(loader), list(loader)               # a resumed epoch replays the same batches
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, second))
    e0 = epoch_indices(len(a_train), shuffle=True, seed=3, epoch=0)
    e1 = epoch_indices(len(a_train), shuffle=True, seed=3, epoch=1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(len(a_train)))
    assert (e0 != e1).float().mean() > 0.9
    c_train, _, _ = load_data("animal_mnist", seed=4)
    assert not torch.equal(a_train.labels, c_train.labels) or not torch.equal(a_train.images, c_train.images)


def test_augmentation_is_shift_and_flip_of_the_source(animal):
    plain, _, _ = animal
    aug = TensorData(plain.images, plain.labels, shift=2, flip=True, fill=plain.fill)
    x, y = next(iter(make_loader(aug, batch_size=24, shuffle=False, epoch=1)))
    src = plain.images[:24]
    assert torch.equal(y, plain.labels[:24])
    fill = plain.fill[0].item()
    padded = torch.nn.functional.pad(src, (2, 2, 2, 2), value=fill)
    moved = 0
    for i in range(24):
        cands = [padded[i, :, dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)]
        cands += [c.flip(2) for c in cands]
        hit = [k for k, c in enumerate(cands) if torch.equal(c, x[i])]
        assert hit, f"sample {i} is not a shift/flip of its source"
        moved += 12 not in hit
    assert moved >= 12                                        # most samples actually changed
    x2, _ = next(iter(make_loader(aug, batch_size=24, shuffle=False, epoch=2)))
    assert not torch.equal(x, x2)                             # augmentation depends on the epoch
    xp, _ = next(iter(make_loader(plain, batch_size=24, shuffle=False)))
    assert torch.equal(xp, src)                               # augment=False: untouched


def test_one_epoch_is_fast():
    train, _, _ = load_data("animal_mnist")
    assert train.shift == 2 and train.flip
    start = time.perf_counter()
    n = sum(len(y) for _, y in make_loader(train, batch_size=256, shuffle=True, epoch=0))
    assert n == len(train)
    assert time.perf_counter() - start < 1.0      # typically ~0.03 s on one core


# ----------------------------------------------------------------------------- distributed

def _indexed(n: int) -> TensorData:
    return TensorData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))


@pytest.mark.parametrize("n,world", [(12, 3), (10, 3), (7, 4)])
def test_distributed_shards_disjoint_and_cover_epoch(n, world):
    ds = _indexed(n)
    shards, lengths = [], []
    for rank in range(world):
        loader = make_loader(ds, batch_size=2, shuffle=True, seed=1, epoch=4, rank=rank, world_size=world)
        shard = torch.cat([y for _, y in loader]).tolist()
        shards.append(shard)
        lengths.append(len(loader))
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards) and len(set(lengths)) == 1
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n))                               # covers the epoch
    assert len(flat) - len(set(flat)) == per_rank * world - n       # repeats only the wrap-around padding
    if n % world == 0:
        assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    # the ranks share one (seed, epoch) permutation
    order = epoch_indices(n, shuffle=True, seed=1, epoch=4).tolist()
    assert shards[0][0] == order[0] and shards[1][0] == order[1]
    dropped = [torch.cat([y for _, y in make_loader(ds, batch_size=1, shuffle=True, seed=1, epoch=4, rank=r,
                                                     world_size=world, drop_last=True)]).tolist()
               for r in range(world)]
    assert all(len(d) == n // world for d in dropped)
    assert len({i for d in dropped for i in d}) == n // world * world


# ----------------------------------------------------------------------------- digits, resize, subsets

def test_digits_sizes_and_resize():
    train, val, info = load_data("digits")
    assert info.train_size + info.val_size + info.duplicates_removed == 1797 == len(train) + len(val)
    assert info.resolution == 8 and train.images.shape[1:] == (1, 8, 8) and info.in_channels == 1
    assert train.shift == 2 and not train.flip                       # no flips for digits
    big_train, big_val, big = load_data("digits", resize=16)
    assert big.resolution == 16 and big_train.images.shape[1:] == (1, 16, 16)
    assert big_val.images.shape == (len(val), 1, 16, 16)
    x, _ = next(iter(make_loader(big_train, batch_size=32, shuffle=True)))
    assert x.shape == (32, 1, 16, 16)


def test_max_train_max_val_are_stratified_and_deterministic():
    full, _, _ = load_data("animal_mnist", augment=False)
    train, val, info = load_data("animal_mnist", max_train=1000, max_val=300, augment=False)
    assert (len(train), len(val), info.train_size, info.val_size) == (1000, 300, 1000, 300)
    counts = np.bincount(full.labels.numpy(), minlength=10)
    sub = np.bincount(train.labels.numpy(), minlength=10)
    assert np.all(np.abs(sub - 1000 * counts / counts.sum()) < 1)
    assert _row_bytes(train.images) <= _row_bytes(full.images)      # a subset, same normalisation
    again, _, _ = load_data("animal_mnist", max_train=1000, max_val=300, augment=False)
    assert torch.equal(again.images, train.images)


# ----------------------------------------------------------------------------- image folders

def _folder(root, classes=("a", "b"), n=3, size=12, mode="RGB"):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


def test_folder_and_imagenet_load(tmp_path):
    root = _folder(tmp_path / "f")
    train, val, info = load_data("folder", root=str(root), in_channels=1, resize=8)
    assert (info.in_channels, info.num_classes, info.resolution, info.classes) == (1, 2, 8, ["a", "b"])
    x, y = next(iter(make_loader(train, batch_size=4, shuffle=True, seed=0)))
    assert x.shape == (4, 1, 8, 8) and y.dtype == torch.int64           # RGB files converted to L
    _, _, native = load_data("folder", root=root)
    assert native.resolution == 12 and native.in_channels == 3
    train, val, info = load_data("imagenet", root=root, resize=16, max_train=4)
    assert info.train_size == 4 and sorted(train[i][1] for i in range(4)) == [0, 0, 1, 1]
    x, _ = next(iter(make_loader(val, batch_size=6, shuffle=False)))
    assert x.shape == (6, 3, 16, 16)


def test_unknown_dataset_lists_known():
    with pytest.raises(PasError) as e:
        load_data("mnist")
    assert "'mnist'" in str(e.value) and all(name in str(e.value) for name in DATASETS)


def test_missing_root_and_root_without_splits(tmp_path):
    with pytest.raises(PasError, match="does not exist"):
        load_data("folder", root=str(tmp_path / "nope"))
    with pytest.raises(PasError, match="needs a root"):
        load_data("imagenet")
    with pytest.raises(PasError, match=r"train not found: expected .* train/ and val/"):
        load_data("imagenet", root=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(PasError, match=r"val not found: expected .* train/ and val/"):
        load_data("imagenet", root=tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(PasError, match="train has no class folders"):
        load_data("folder", root=tmp_path)


def test_empty_class_folder(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "val" / "b" / "0.png").unlink()
    (root / "val" / "b" / "1.png").unlink()
    (root / "val" / "b" / "2.png").unlink()
    with pytest.raises(PasError) as e:
        load_data("folder", root=root)
    assert f"class folder {root / 'val' / 'b'} is empty" in str(e.value)


def test_mismatched_class_folders(tmp_path):
    root = _folder(tmp_path / "f")
    shutil.rmtree(root / "val" / "b")
    with pytest.raises(PasError, match=r"missing \['b'\]"):
        load_data("folder", root=root)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file(tmp_path, workers):
    root = _folder(tmp_path / "f", n=2, size=8)
    bad = root / "train" / "a" / "x.png"
    bad.write_bytes(b"this is not a png at all")
    train, _, _ = load_data("folder", root=root, in_channels=1)
    with pytest.raises(PasError) as e:
        for _ in make_loader(train, batch_size=8, shuffle=False, num_workers=workers):
            pass
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_cifar_root_without_files(tmp_path):
    for name in ("cifar10", "cifar100"):
        with pytest.raises(PasError, match=f"{name} not found under {tmp_path}"):
            load_data(name, root=tmp_path)


def test_argument_errors(animal):
    train = animal[0]
    with pytest.raises(PasError, match="val_fraction"):
        load_data("digits", val_fraction=1.0)
    with pytest.raises(PasError, match="in_channels"):
        load_data("digits", in_channels=3)
    with pytest.raises(PasError, match="rank 2"):
        make_loader(train, batch_size=8, shuffle=True, rank=2, world_size=2)
    with pytest.raises(PasError, match="batch_size 0"):
        make_loader(train, batch_size=0, shuffle=True)
