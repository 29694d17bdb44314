"""Check an ImageFolder dataset up front: every file training would read, opened and decoded once.

One unreadable image in a 1.28 M-image ImageNet folder stops a training job when it is drawn,
possibly hours in. :func:`check_image_folder` finds every such file first, in parallel, and
returns a report; ``pas check-data`` writes it (atomically) and, with ``dataset.bad_images: stop``,
exits non-zero naming the first bad files. With ``skip`` the training stages read the report
(``dataset.bad_images_report``) and :func:`pas.data.load_data` drops the files it lists
(``exclude=``), so ``pas.data`` never reads a report itself and knows nothing of the workflow.

What is checked, per file (exactly the files ``torchvision.datasets.ImageFolder`` lists under
``root/train`` and ``root/val``, same extensions, same order):

1. the file is not empty (``empty file``);
2. ``PIL.Image.open`` identifies it and ``verify()`` passes (the header, and for PNG every chunk's
   CRC): a text file named ``.jpg`` fails here (``cannot identify image file``);
3. the pixel data decodes: ``load()``. ``verify()`` reads no JPEG scan data, so a truncated JPEG
   passes it and fails only here (``image file is truncated``). A JPEG is decoded at 1/8 scale
   (``Image.draft``: libjpeg's DCT scaling still reads every entropy-coded byte, so truncation and
   broken markers are found, but skips most of the inverse DCT and colour conversion); other
   formats are decoded in full.

Not checked: whether a decodable image shows what its class says, or damage the decoder does
not notice (flipped bits inside a JPEG scan decode to wrong pixels without an error). Measured on
generated 500x375 JPEGs (``benchmarks/data_loader.py``; README, "Data loading"): 986 images per CPU
second, against 24,871 for ``verify()`` alone (which misses truncation) and 531 for a full decode.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pas.errors import PasError

__all__ = ["IMAGE_FOLDER_DATASETS", "BAD_IMAGES", "check_file", "image_files", "check_image_folder",
           "check_data", "read_report", "report_exclusions"]

IMAGE_FOLDER_DATASETS = ("imagenet", "folder")
BAD_IMAGES = ("stop", "skip")
SPLITS = ("train", "val")
JPEG_DRAFT_SCALE = 8  # decode JPEGs at 1/8 of their size (libjpeg's smallest DCT scaling)
REPORT_VERSION = 1


def check_file(path: str) -> str | None:
    """None if ``path`` opens, verifies and decodes; otherwise a one-line reason."""
    from PIL import Image
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // JPEG_DRAFT_SCALE), max(1, img.height // JPEG_DRAFT_SCALE)))
            img.load()
    except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        text = (str(e).splitlines() or [""])[0].strip()
        return text or type(e).__name__
    return None


def image_files(root: str | Path, name: str = "folder") -> dict[str, list[str]]:
    """Every file ImageFolder reads under ``root/train`` and ``root/val`` (absolute paths, its order).

    The folder structure is checked as :func:`pas.data.load_data` checks it (same one-line errors).
    """
    from torchvision.datasets.folder import make_dataset

    from pas.data import _check_image_root, _image_extensions
    root, classes = _check_image_root(name, root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return {split: [p for p, _ in make_dataset(str(root / split), class_to_idx, extensions=_image_extensions())]
            for split in SPLITS}


def _check_chunk(paths: list[str]) -> list[str | None]:
    return [check_file(p) for p in paths]


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="check-data", unit="img", file=sys.stderr, dynamic_ncols=True)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_image_folder(root: str | Path, *, name: str = "folder", workers: int | None = None,
                       progress: bool | None = None, chunk: int = 64) -> dict:
    """Check every image of ``root/train`` and ``root/val`` (see the module docstring); the report.

    ``workers`` threads (default: the CPUs this process may use; 1 checks in the calling thread);
    ``progress``: a tqdm bar on stderr (None: only on a terminal). The report::

        {"dataset", "root", "checked": true, "checks", "workers", "seconds", "images_per_second",
         "splits": {"train": {"files", "bad"}, "val": {...}},
         "bad": [{"split", "path" (relative to root), "reason"}, ...]}   # in ImageFolder's order
    """
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PasError(f"workers {workers!r} is invalid: expected a positive integer")
    progress = sys.stderr.isatty() if progress is None else progress
    import PIL.Image  # noqa: F401  imports are not part of the time taken
    import torchvision.datasets.folder  # noqa: F401
    t0 = time.perf_counter()
    files = image_files(root, name)
    root = Path(root)
    order = [(split, p) for split in SPLITS for p in files[split]]
    chunks = [[p for _, p in order[i:i + chunk]] for i in range(0, len(order), chunk)]
    bar = _progress_bar(len(order), progress)
    reasons: list[str | None] = []
    try:
        if workers == 1 or len(chunks) <= 1:
            for c in chunks:
                reasons += _check_chunk(c)
                if bar is not None:
                    bar.update(len(c))
        else:
            # threads, not processes: PIL decodes with the GIL released, so the threads run in
            # parallel (1.79x with 2 on 2 cores, benchmarks/data_loader.py), and nothing is forked from a caller
            # that may hold threads of its own (torch's pools, tqdm's monitor, MLflow): a child
            # forked while one of them held a lock hung forever under pytest. No __main__ import
            # either (spawn's pitfall for scripts and notebooks), and nothing is left running.
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="check-data") as pool:
                for result in pool.map(_check_chunk, chunks):  # map keeps ImageFolder's order
                    reasons += result
                    if bar is not None:
                        bar.update(len(result))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    bad = [{"split": split, "path": os.path.relpath(p, root), "reason": r}
           for (split, p), r in zip(order, reasons) if r is not None]
    return {"version": REPORT_VERSION, "dataset": name, "root": str(root.resolve()), "checked": True,
            "checks": f"open + verify() + load() (JPEG decoded at 1/{JPEG_DRAFT_SCALE} scale)",
            "workers": workers, "seconds": round(seconds, 3),
            "images_per_second": round(len(order) / seconds, 1) if seconds > 0 else None,
            "splits": {s: {"files": len(files[s]), "bad": sum(b["split"] == s for b in bad)} for s in SPLITS},
            "bad": bad}


def check_data(cfg: dict, *, out: str | None = None, workers: int | None = None,
               progress: bool | None = None) -> dict:
    """``pas check-data``: check the configured dataset, write the report to ``out`` (atomically).

    In-memory and CIFAR datasets have nothing to check (their report says so). With
    ``dataset.bad_images: stop`` and any bad file, the report is written and then a PasError names
    how many files are bad and the first two.
    """
    from pas.io import atomic_write_json
    d = cfg["dataset"]
    policy = check_policy(d)
    name = str(d["name"]).lower().replace("-", "_")
    if out is not None:
        _check_out(out)
    if name not in IMAGE_FOLDER_DATASETS:
        report = {"version": REPORT_VERSION, "dataset": name, "root": None, "checked": False,
                  "reason": f"dataset {name!r} is not an image folder: nothing to check", "bad": []}
        print(f"check-data: {report['reason']}", flush=True)
        if out is not None:
            atomic_write_json(out, report)
        return report
    report = check_image_folder(d["root"], name=name, workers=workers, progress=progress)
    report["bad_images"] = policy
    if out is not None:
        atomic_write_json(out, report)
    total = sum(s["files"] for s in report["splits"].values())
    bad = report["bad"]
    for b in bad:  # the whole list on stdout (a workflow log keeps it even if the report is removed)
        print(f"unreadable: {b['path']} ({b['reason']})", flush=True)
    action = "; training skips them (dataset.bad_images=skip)" if bad and policy == "skip" else ""
    print(f"check-data: {total} images in {report['seconds']:.1f} s ({report['images_per_second']} img/s, "
          f"workers={report['workers']}): {len(bad)} unreadable{action}", flush=True)
    if bad and policy == "stop":
        first = ", ".join(f"{Path(report['root']) / b['path']} ({b['reason']})" for b in bad[:2])
        more = f" and {len(bad) - 2} more" if len(bad) > 2 else ""
        where = f" (all listed in {out})" if out else ""
        raise PasError(f"{len(bad)} of {total} images cannot be read: {first}{more}{where}; expected readable "
                       f"images: fix or remove them, or set dataset.bad_images=skip to train without them")
    return report


def check_policy(dataset_cfg: dict) -> str:
    policy = dataset_cfg.get("bad_images", "stop")
    if policy not in BAD_IMAGES:
        raise PasError(f"dataset.bad_images {policy!r} is invalid: expected one of {', '.join(BAD_IMAGES)}")
    return policy


def _check_out(out: str) -> None:
    parent = Path(out).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PasError(f"output folder {str(parent)!r} cannot be created: {e.strerror}") from None


def read_report(path: str | Path) -> dict:
    """A report written by ``pas check-data``; a missing or malformed one is a one-line PasError."""
    from pas.io import read_json
    report = read_json(path)
    if not isinstance(report, dict) or not isinstance(report.get("bad"), list) or \
            not all(isinstance(b, dict) and isinstance(b.get("path"), str) for b in report["bad"]):
        raise PasError(f"{str(path)!r} is not a pas check-data report: expected a JSON object whose 'bad' "
                       "lists {path, reason} objects")
    return report


def report_exclusions(path: str | Path, name: str, root) -> list[str]:
    """The files (relative to ``root``) a report lists as unreadable, after checking it was written
    for this dataset and root; what ``load_data(..., exclude=...)`` takes."""
    report = read_report(path)
    key = str(name).lower().replace("-", "_")
    if key not in IMAGE_FOLDER_DATASETS:
        return []
    if not report.get("checked") or report.get("root") is None or \
            Path(report["root"]).resolve() != Path(str(root)).resolve():
        raise PasError(f"check-data report {str(path)!r} was written for root {report.get('root')!r}, not "
                       f"{str(root)!r}: expected a report of this dataset (rerun pas check-data)")
    return [b["path"] for b in report["bad"]]


# -- CLI -----------------------------------------------------------------------------------------

def _cli(args) -> int:
    from pas.config import load_config
    cfg = load_config(args.config, args.overrides)
    progress = True if args.progress else cfg["progress"]
    check_data(cfg, out=args.out, workers=args.workers, progress=progress)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("check-data", help="list every unreadable image of an ImageFolder dataset (imagenet, "
                                          "folder) before training; dataset.bad_images: stop | skip")
    p.add_argument("--config", help="stage config (YAML or JSON): its dataset section is checked")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dataset.root=/data/imagenet (repeatable)")
    p.add_argument("--out", help="JSON report (written atomically): files and bad files per split, every bad "
                                 "file with a one-line reason, seconds taken")
    p.add_argument("--workers", type=_positive, default=None, help="checking threads (default: the CPUs)")
    p.add_argument("--progress", action="store_true", help="a progress bar on stderr even when not a terminal")
    p.set_defaults(func=_cli)


def _positive(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value
