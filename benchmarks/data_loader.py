"""8. Does the data loader feed a GPU? ImageNet-style decoding + augmentation per worker, and the check.

Generates an ImageNet-like folder of JPEGs (sizes around 500x375, quality 90, ~80 KB each) in a
temporary folder and measures, on this machine:

* ``pas check-data``'s per-file check against PIL's ``verify()`` alone and a full decode, in one
  process (images per CPU second), alternately in rounds; and the whole check
  (``check_image_folder``) with 1 and each of ``--workers`` threads, alternately in rounds (images
  per wall second, and the speed-up over 1 thread: PIL decodes with the GIL released);
* the training input pipeline of ``dataset.name: imagenet`` (``pas.data.load_data``'s own train
  transform at 224: ImageFolder decode, RandomResizedCrop, flip, ToTensor, Normalize) through a
  ``torch.utils.data.DataLoader`` with 1 and 2 worker processes (persistent, the first epoch not
  timed), alternately in rounds: images/s in all and per worker; and the same pipeline in this
  process, per wall second and per CPU second of the process (on a shared machine the wall
  figures fall with the other programs' load, the CPU-second figure is what one dedicated core
  gives a worker, and is the one the workers-per-GPU figure uses);

then how many workers one GPU needs at ``--gpu-rate`` training images/s. The default 1,000 img/s is
an assumption, not a measurement: RepVGG-B1 (11.8 GMACs, training form) with AMP and channels_last
on one A100-class GPU, about 2.9x ResNet-50's MACs at ResNet-50's ~2,500-3,000 img/s there.
The files are in the page cache: disk or network-file-system reads are not part of the figure.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_folder(root: Path, images: int, classes: int = 10, seed: int = 0) -> float:
    """``images`` JPEGs in root/train and a few in root/val; their mean size in KB."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    sizes = []
    for split, n in (("train", images), ("val", classes)):
        for i in range(n):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.normal(500, 60)), int(rng.normal(375, 45))
            w, h = min(max(w, 200), 800), min(max(h, 150), 600)
            # smooth shapes plus sensor-like noise: compresses like a photo (~80 KB at 500x375, q90)
            base = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8))
            pixels = np.asarray(base.resize((w, h), Image.BILINEAR), dtype=np.int16)
            pixels = pixels + rng.integers(-20, 21, pixels.shape)
            path = folder / f"{split}_{i:05d}.JPEG"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def check_rates(files: list[str], repeats: int) -> dict[str, float]:
    """Images per CPU second of verify() alone, pas check-data's check and a full RGB decode, in rounds."""
    from PIL import Image

    from pas.datacheck import check_file

    def verify(path):
        with Image.open(path) as img:
            img.verify()

    def full(path):
        with Image.open(path) as img:
            img.convert("RGB")

    ways = {"verify() only": verify, "check-data (verify + load, JPEG at 1/8)": check_file,
            "full decode (what training does)": full}
    times = {k: [] for k in ways}
    for r in range(repeats):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            t0 = time.process_time()
            for f in files:
                ways[name](f)
            times[name].append(time.process_time() - t0)
    return {k: len(files) / statistics.median(v) for k, v in times.items()}


def check_scaling(root: Path, workers: list[int], repeats: int) -> dict[int, float]:
    """Images per wall second of the whole folder check with each thread count, alternately in rounds."""
    from pas.datacheck import check_image_folder
    counts = sorted({1, *workers})
    times = {w: [] for w in counts}
    n = 0
    for r in range(repeats):
        for w in (counts if r % 2 == 0 else list(reversed(counts))):
            report = check_image_folder(root, workers=w, progress=False)
            n = sum(s["files"] for s in report["splits"].values())
            times[w].append(report["seconds"])
    return {w: n / statistics.median(v) for w, v in times.items()}


def cpu_rate(dataset, repeats: int) -> tuple[float, float]:
    """Images/s of the pipeline in this process: per wall second and per CPU second of this process
    (the second does not fall when other programs share the cores: what one dedicated core gives)."""
    walls, cpus = [], []
    for r in range(repeats):
        torch.manual_seed(r)
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(len(dataset)):
            dataset[i]
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return len(dataset) / statistics.median(walls), len(dataset) / statistics.median(cpus)


def loader_rates(dataset, workers: list[int], batch: int, repeats: int) -> dict[int, float]:
    """Images/s of a DataLoader over ``dataset`` with each worker count, epochs alternated."""
    from torch.utils.data import DataLoader
    loaders = {w: DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w, persistent_workers=True,
                             generator=torch.Generator().manual_seed(0)) for w in workers}
    for loader in loaders.values():  # start the workers, warm the page cache
        for _ in loader:
            pass
    times = {w: [] for w in workers}
    for r in range(repeats):
        for w in (workers if r % 2 == 0 else list(reversed(workers))):
            t0 = time.perf_counter()
            n = sum(len(y) for _, y in loaders[w])
            times[w].append(time.perf_counter() - t0)
    del loaders
    return {w: n / statistics.median(t) for w, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=320, help="generated training JPEGs")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to measure")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per worker count (median)")
    p.add_argument("--gpu-rate", type=float, default=1000.0,
                   help="training images/s of one GPU (assumed: RepVGG-B1, AMP, A100-class)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of one training job (config/paper.yaml: 8)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import os
    from pas.data import load_data
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")

    with tempfile.TemporaryDirectory(prefix="pas-loader-") as tmp:
        root = Path(tmp)
        kb = make_folder(root, a.images)
        files = sorted(str(f) for f in (root / "train").rglob("*.JPEG"))
        checks = check_rates(files, a.repeats)
        scaling = check_scaling(root, a.workers, a.repeats)
        train, _, info = load_data("imagenet", root=str(root), augment=True)
        wall0, cpu0 = cpu_rate(train, max(1, a.repeats // 2))
        rates = loader_rates(train, a.workers, a.batch, a.repeats)

    print(f"{len(files)} generated JPEGs, ~500x375, mean {kb:.0f} KB, in the page cache; in this process:")
    base = checks["full decode (what training does)"]
    for name, rate in checks.items():
        print(f"  {name:<42} {rate:7.0f} img per CPU second ({rate / base:.1f}x a full decode)")
    print("the whole folder check (pas check-data), threads:")
    for w, rate in scaling.items():
        print(f"  {w} thread{'s' if w > 1 else ' '}  {rate:7.0f} img/s  ({rate / scaling[1]:.2f}x 1 thread)")
    print(f"imagenet train pipeline at {info.resolution} (decode, RandomResizedCrop, flip, ToTensor, Normalize), "
          f"batch {a.batch}:")
    print(f"  in this process  {wall0:7.0f} img/s per wall second, {cpu0:.0f} per CPU second (one core's worth)")
    for w, rate in rates.items():
        print(f"  {w} worker{'s' if w > 1 else ' '}  {rate:7.0f} img/s  ({rate / w:.0f} img/s per worker)")
    # per CPU second: the wall figures above fall when other programs share the cores
    per_worker = cpu0
    need = math.ceil(a.gpu_rate / per_worker)
    print(f"one GPU at {a.gpu_rate:.0f} img/s (assumed: RepVGG-B1 training, AMP, A100-class) needs "
          f"{a.gpu_rate / per_worker:.1f} -> {need} workers at {per_worker:.0f} img/s each (one core each); "
          f"a {a.gpus}-GPU job {need * a.gpus} workers (+ {a.gpus} training processes)")
    return {"benchmark": "data loader", "per_worker": per_worker, "in_process_wall": wall0, "workers_per_gpu": need, "checks": checks,
            "check_threads": scaling, "rates": rates}


if __name__ == "__main__":
    main()
