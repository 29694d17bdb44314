"""pas check-data: every unreadable file of an image folder found up front; stop or skip.

The oracle is the folder itself: the test breaks exactly three files (a zero-byte .jpg, the first
half of a real JPEG, a text file named .jpg) among readable JPEGs and PNGs of mixed sizes, and
counts the readable ones as it writes them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pas.datacheck as datacheck
from pas.data import load_data, make_loader
from pas.datacheck import check_file, check_image_folder, report_exclusions
from pas.errors import PasError

PAS = [sys.executable, "-m", "pas.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BROKEN = {"train/cat/zero.jpg": "empty file", "train/dog/half.jpg": "truncated", "val/fox/text.jpg": "cannot identify"}


def _make_folder(root: Path) -> dict:
    """3 classes x (5 train, 3 val) readable images, JPEG and PNG, 24..90 pixels a side, RGB and L;
    then the BROKEN files. Returns the readable counts per split."""
    from PIL import Image
    rng = np.random.default_rng(1)
    counts = {"train": 0, "val": 0}
    for split, n in (("train", 5), ("val", 3)):
        for c in ("cat", "dog", "fox"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(24, 90, 2))
                mode = "L" if i == 2 else "RGB"
                shape = (h, w) if mode == "L" else (h, w, 3)
                img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
                img.save(d / (f"{i}.jpg" if i % 2 == 0 else f"{i}.png"), quality=90)
                counts[split] += 1
    (root / "train/cat/zero.jpg").write_bytes(b"")
    whole = (root / "train/dog/0.jpg").read_bytes()
    (root / "train/dog/half.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "val/fox/text.jpg").write_text("these are words, not pixels\n" * 10)
    return counts


@pytest.fixture()
def folder(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "images"
    return root, _make_folder(root)


def _run(argv, cwd):
    return subprocess.run([*PAS, *argv], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=120)


def _flags(root, policy="stop"):
    return ["--set", "dataset.name=folder", "--set", f"dataset.root={root}", "--set", f"dataset.bad_images={policy}"]


@pytest.mark.parametrize("workers", [1, 2])
def test_lists_exactly_the_broken_files_with_reasons(folder, workers):
    root, counts = folder
    report = check_image_folder(root, workers=workers, progress=False, chunk=4)  # several chunks per worker
    assert {b["path"]: b["split"] for b in report["bad"]} == {p: p.split("/")[0] for p in BROKEN}
    for b in report["bad"]:
        assert BROKEN[b["path"]] in b["reason"] and "\n" not in b["reason"]
    assert report["splits"] == {"train": {"files": counts["train"] + 2, "bad": 2},
                                "val": {"files": counts["val"] + 1, "bad": 1}}
    assert report["root"] == str(root.resolve()) and report["workers"] == workers


def test_verify_alone_misses_the_truncated_jpeg(folder):
    """Why the check decodes: PIL's verify() passes the first half of a JPEG, load() does not."""
    from PIL import Image
    root, _ = folder
    half = root / "train/dog/half.jpg"
    with Image.open(half) as img:
        img.verify()  # no error
    assert "truncated" in check_file(str(half))
    assert check_file(str(root / "train/dog/0.jpg")) is None


def test_stop_exits_non_zero_with_one_line_and_the_full_report(folder, tmp_path):
    root, counts = folder
    r = _run(["check-data", *_flags(root), "--out", "out/check.json", "--workers", "2"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pas: error: 3 of ")
    total = counts["train"] + counts["val"] + 3
    assert f"3 of {total} images cannot be read" in lines[0]
    assert str(root / "train/cat/zero.jpg") in lines[0] and "and 1 more" in lines[0]  # first two named
    report = json.loads((tmp_path / "out/check.json").read_text())
    assert sorted(b["path"] for b in report["bad"]) == sorted(BROKEN)
    assert sorted(line.split()[1] for line in r.stdout.splitlines() if line.startswith("unreadable:")) == sorted(BROKEN)


def test_skip_exits_zero_and_training_data_drops_exactly_those(folder, tmp_path):
    root, counts = folder
    r = _run(["check-data", *_flags(root, "skip"), "--out", "check.json", "--workers", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    exclude = report_exclusions(tmp_path / "check.json", "folder", root)
    train, val, info = load_data("folder", root=root, resize=16, exclude=exclude)
    assert (len(train), len(val), info.skipped) == (counts["train"], counts["val"], 3)
    assert (info.train_size, info.val_size) == (counts["train"], counts["val"])
    seen = sum(len(y) for _, y in make_loader(train, batch_size=4, shuffle=True))
    seen += sum(len(y) for _, y in make_loader(val, batch_size=4, shuffle=False))
    assert seen == counts["train"] + counts["val"]  # every remaining file decodes
    _, _, imagenet = load_data("imagenet", root=root, resize=16, exclude=exclude)
    assert imagenet.skipped == 3 and imagenet.train_size == counts["train"]
    with pytest.raises(PasError, match="cannot read image .*zero.jpg"):  # without them: stops at a bad file
        train, _, _ = load_data("folder", root=root, resize=16)
        for _ in make_loader(train, batch_size=4, shuffle=False):
            pass


def test_a_training_stage_skips_with_one_log_line(folder, tmp_path):
    root, counts = folder
    r = _run(["check-data", *_flags(root, "skip"), "--out", "check.json", "--progress"], tmp_path)
    assert r.returncode == 0 and "check-data: 100%" in r.stderr  # --progress: a bar even without a terminal
    r = _run(["pretrain", *_flags(root, "skip"), "--set", "dataset.bad_images_report=check.json",
              "--set", "dataset.resize=16", "--set", "backbone=repvgg_a0_mini", "--set", "epochs=1",
              "--set", "batch_size=8", "--set", "threads=1", "--set", "tracking.enabled=false",
              "--out-weights", "w.pt", "--out-metrics", "m.json"], tmp_path)
    assert r.returncode == 0, r.stderr
    logged = [line for line in r.stderr.splitlines() if line.startswith("[data]")]
    assert logged == [f"[data] skipped 3 unreadable images listed in check.json (dataset.bad_images=skip): "
                      f"{counts['train']} train, {counts['val']} val images"]
    record = json.loads((tmp_path / "m.run.json").read_text())
    assert {"step": 0, "values": {"skipped_images": 3.0}} in [{k: m[k] for k in ("step", "values")}
                                                              for m in record["metrics"]]


def test_report_of_another_root_is_refused(folder, tmp_path):
    root, _ = folder
    report = check_image_folder(root, workers=1, progress=False)
    (tmp_path / "r.json").write_text(json.dumps(report))
    other = tmp_path / "other"
    _make_folder(other)
    with pytest.raises(PasError, match="was written for root"):
        report_exclusions(tmp_path / "r.json", "folder", other)
    (tmp_path / "bad.json").write_text('{"bad": [1, 2]}')
    with pytest.raises(PasError, match="is not a pas check-data report"):
        report_exclusions(tmp_path / "bad.json", "folder", root)


def test_report_is_written_atomically(folder, tmp_path, monkeypatch):
    """A check that fails part-way leaves the previous report as it was and no temporary file."""
    root, _ = folder
    out = tmp_path / "out" / "check.json"
    out.parent.mkdir()
    out.write_text("previous report\n")
    calls = []

    def fails_on_the_fifth(path):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return None

    monkeypatch.setattr(datacheck, "check_file", fails_on_the_fifth)
    cfg = {"dataset": {"name": "folder", "root": str(root), "bad_images": "skip"}}
    with pytest.raises(KeyboardInterrupt):
        datacheck.check_data(cfg, out=str(out), workers=1, progress=False)
    assert out.read_text() == "previous report\n" and os.listdir(out.parent) == ["check.json"]
    # a folder that is not there: one line, no report
    r = _run(["check-data", *_flags(tmp_path / "nowhere"), "--out", "new/check.json"], tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "new" / "check.json").exists()


def test_in_memory_dataset_has_nothing_to_check(tmp_path):
    r = _run(["check-data", "--out", "check.json"], tmp_path)
    assert r.returncode == 0 and "nothing to check" in r.stdout and r.stderr == ""
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["checked"] is False and report["bad"] == [] and report["dataset"] == "animal_mnist"
