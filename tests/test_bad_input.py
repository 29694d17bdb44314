"""Bad input: every case exits 2 with ONE line 'pas: error: ...' that names the bad value and what was
expected, shows no traceback, and leaves none of the declared outputs behind.

The cases run the CLI's own entry point in process (seconds for all of them); the few in
SUBPROCESS_CASES run as `python -m pas.cli` from the shell, as a workflow calls it, to check the
exit status and stderr of a real process (a data loader worker, the MLflow store, the parser).

Tests run as root here, so permission bits cannot make a folder unwritable: an output path under a
regular file ('afile.txt/out.pt') is what cannot be written.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PAS = [sys.executable, "-m", "pas.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--set", "backbone=repvgg_a0_mini", "--set", "dataset.max_train=64", "--set", "dataset.max_val=32",
         "--set", "threads=1", "--set", "batch_size=32", "--set", "epochs=1", "--set", "tracking.enabled=false"]

# declared outputs of each stage, relative to the case's own (empty) working folder
PRETRAIN_OUT = ["--out-weights", "out/w.pt", "--out-metrics", "out/m.json"]
SEARCH_OUT = ["--out-weights", "out/w.pt", "--out-masks", "out/masks.json", "--out-history", "out/history.json",
              "--out-metrics", "out/m.json"]
FINETUNE_OUT = ["--out-weights", "out/w.pt", "--out-metrics", "out/m.json"]


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """Inputs, good and bad, made in-process (no stage run needed)."""
    from PIL import Image
    from safetensors.torch import save_file

    from pas.models import arch_for, build, build_deployed
    from pas.stages import _masks_record

    d = tmp_path_factory.mktemp("inputs")
    small = dict(num_classes=10, in_channels=1, resolution=28)
    a0, a1 = arch_for("repvgg_a0_mini", **small), arch_for("repvgg_a1_mini", **small)
    torch.manual_seed(0)
    torch.save(build("repvgg_a0_mini", **small).state_dict(), d / "a0.pt")
    torch.save(build("repvgg_a1_mini", **small).state_dict(), d / "a1.pt")
    (d / "trunc.pt").write_bytes((d / "a0.pt").read_bytes()[:1000])
    with open(d / "notweights.pkl", "wb") as f:
        pickle.dump({"epochs": 3, "notes": ["not", "weights"]}, f, protocol=4)
    half = [torch.arange(w) < max(1, w // 2) for w in a0.searchable_widths()]
    (d / "a0_masks.json").write_text(json.dumps(_masks_record(a0, half)))
    (d / "a1_masks.json").write_text(json.dumps(_masks_record(a1, [torch.ones(w, dtype=torch.bool)
                                                                     for w in a1.searchable_widths()])))
    (d / "bad_masks.json").write_text('{"masks": [[1, 0')
    (d / "nomasks.json").write_text('{"widths": [3, 3]}')
    (d / "cfg_nested.yaml").write_text("optim:\n  lrr: 0.1\n")
    (d / "bad.yaml").write_text("epochs: [1, 2\nbackbone: : x\n")
    (d / "list.yaml").write_text("- epochs\n- 3\n")
    (d / "afile.txt").write_text("a regular file, not a folder\n")
    # a deployed 28x28 network, for evaluating it on the wrong dataset
    plain = build_deployed(a0.with_widths([sum(m.tolist()) for m in half]))
    (d / "deployed").mkdir()
    (d / "deployed/arch.json").write_text(json.dumps(plain.arch.to_dict()))
    save_file(plain.state_dict(), str(d / "deployed/model.safetensors"))
    # image folders: a good one with an empty class folder, one with a garbage .png
    rng = np.random.default_rng(0)
    for root in ("empty_class", "corrupt"):
        for split in ("train", "val"):
            for c in ("cat", "dog"):
                folder = d / root / split / c
                folder.mkdir(parents=True)
                if root == "empty_class" and split == "train" and c == "dog":
                    continue
                for i in range(3):
                    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (d / "corrupt/train/cat/3_garbage.png").write_bytes(b"\x89PNG this is not an image" * 20)
    return d


def A(name):
    """Placeholder for a path inside the `art` folder, filled in by the test."""
    return ("ART", name)


# (id, argv, substrings the one error line must contain)
CASES = [
    ("unknown-key", ["pretrain", *SMALL, "--set", "epochz=3", *PRETRAIN_OUT],
     ["unknown config key 'epochz'", "expected one of", "epochs"]),
    ("unknown-nested-key-in-file", ["pretrain", "--config", A("cfg_nested.yaml"), *SMALL, *PRETRAIN_OUT],
     ["'optim.lrr'", "expected one of", "lr"]),
    ("wrong-type", ["pretrain", *SMALL, "--set", "epochs=ten", *PRETRAIN_OUT],
     ["'epochs'", "must be int", "'ten'"]),
    ("negative-epochs", ["pretrain", *SMALL, "--set", "epochs=-1", *PRETRAIN_OUT],
     ["'epochs'", "must be >= 0", "-1"]),
    ("zero-batch", ["pretrain", *SMALL, "--set", "batch_size=0", *PRETRAIN_OUT],
     ["'batch_size'", "must be >= 1", "got 0"]),
    ("override-not-key-value", ["pretrain", *SMALL, "--set", "epochs", *PRETRAIN_OUT],
     ["'epochs'", "KEY=VALUE"]),
    ("unknown-backbone", ["pretrain", *SMALL, "--set", "backbone=vgg16", *PRETRAIN_OUT],
     ["'vgg16'", "known models", "repvgg_a0_mini", "torchvision:NAME"]),
    ("target-is-full", ["search", *SMALL, "--set", "search.target=100%", "--weights", A("a0.pt"), *SEARCH_OUT],
     ["'100%'", "not below the full network", "allowed range"]),
    ("target-above-full", ["prune", *SMALL, "--set", "search.method=l1", "--set", "search.target=150%",
                           "--weights", A("a0.pt"), "--out-masks", "out/masks.json"],
     ["'150%'", "not below the full network", "allowed range"]),
    ("target-zero", ["prune", *SMALL, "--set", "search.method=l1", "--set", "search.target=0",
                     "--weights", A("a0.pt"), "--out-masks", "out/masks.json"],
     ["target 0", "must be positive", "allowed range"]),
    ("target-negative", ["search", *SMALL, "--set", "search.target=-5", "--weights", A("a0.pt"), *SEARCH_OUT],
     ["target -5", "must be positive"]),
    ("target-below-min-widths", ["prune", *SMALL, "--set", "search.method=uniform", "--set", "search.target=0.0001",
                                 "--weights", A("a0.pt"), "--out-masks", "out/masks.json"],
     ["0.0001", "below", "1 channel(s) per layer", "allowed range"]),
    ("floor-zero", ["search", *SMALL, "--set", "search.floor=0", "--weights", A("a0.pt"), *SEARCH_OUT],
     ["'search.floor'", "(0, 1]", "got 0"]),
    ("floor-above-one", ["prune", *SMALL, "--set", "search.method=uniform", "--set", "search.floor=1.5",
                         "--weights", A("a0.pt"), "--out-masks", "out/masks.json"],
     ["'search.floor'", "(0, 1]", "1.5"]),
    ("floor-above-target", ["search", *SMALL, "--set", "search.floor=0.9", "--set", "search.target=50%",
                            "--weights", A("a0.pt"), *SEARCH_OUT],
     ["'50%'", "below", "floor 0.9", "allowed range"]),
    ("unknown-objective", ["search", *SMALL, "--set", "search.objective=greedy", "--weights", A("a0.pt"),
                           *SEARCH_OUT],
     ["'search.objective'", "constraint", "paper", "'greedy'"]),
    ("target-lots", ["search", *SMALL, "--set", "search.target=lots", "--weights", A("a0.pt"), *SEARCH_OUT],
     ["'lots'", "not a MACs figure", "expected e.g."]),
    ("unknown-prune-method", ["prune", *SMALL, "--set", "search.method=magic", "--weights", A("a0.pt"),
                              "--out-masks", "out/masks.json"],
     ["'magic'", "expected one of", "uniform"]),
    ("prune-without-weights", ["prune", *SMALL, "--set", "search.method=bn_gamma", "--set", "search.target=50%",
                               "--out-masks", "out/masks.json"],
     ["search.method 'bn_gamma'", "expected --weights"]),
    ("imagenet-without-root", ["pretrain", *SMALL, "--set", "dataset.name=imagenet", *PRETRAIN_OUT],
     ["'imagenet'", "needs a root folder", "root=PATH"]),
    ("imagenet-missing-root", ["pretrain", *SMALL, "--set", "dataset.name=imagenet",
                               "--set", "dataset.root=/nonexistent/imagenet", *PRETRAIN_OUT],
     ["/nonexistent/imagenet", "does not exist", "expected a folder"]),
    ("folder-without-root", ["pretrain", *SMALL, "--set", "dataset.name=folder", *PRETRAIN_OUT],
     ["'folder'", "needs a root folder"]),
    ("empty-class-folder", ["pretrain", *SMALL, "--set", "dataset.name=folder", "--set",
                            ("ART", "dataset.root={}", "empty_class"), *PRETRAIN_OUT],
     ["train/dog is empty", "expected at least one image"]),
    ("corrupt-image", ["pretrain", *SMALL, "--set", "dataset.name=folder", "--set",
                       ("ART", "dataset.root={}", "corrupt"), *PRETRAIN_OUT],
     ["3_garbage.png", "cannot read image", "expected a valid image file"]),
    ("corrupt-image-in-a-worker", ["pretrain", *SMALL, "--set", "dataset.name=folder", "--set", "workers=1",
                                   "--set", ("ART", "dataset.root={}", "corrupt"), *PRETRAIN_OUT],
     ["3_garbage.png", "cannot read image", "expected a valid image file"]),
    ("check-data-unknown-policy", ["check-data", "--set", "dataset.name=folder", "--set", "dataset.bad_images=maybe",
                                   "--set", ("ART", "dataset.root={}", "corrupt"), "--out", "out/check.json"],
     ["dataset.bad_images 'maybe'", "expected one of stop, skip"]),
    ("skip-without-report", ["pretrain", *SMALL, "--set", "dataset.name=folder", "--set", "dataset.bad_images=skip",
                             "--set", ("ART", "dataset.root={}", "corrupt"), *PRETRAIN_OUT],
     ["dataset.bad_images 'skip' needs dataset.bad_images_report", "pas check-data"]),
    ("skip-with-missing-report", ["pretrain", *SMALL, "--set", "dataset.name=folder", "--set", "dataset.bad_images=skip",
                                  "--set", "dataset.bad_images_report=nope/check.json",
                                  "--set", ("ART", "dataset.root={}", "corrupt"), *PRETRAIN_OUT],
     ["'nope/check.json' does not exist"]),
    ("wrong-channel-count", ["pretrain", *SMALL, "--set", "dataset.in_channels=3", *PRETRAIN_OUT],
     ["in_channels 3", "'animal_mnist'", "expected 1"]),
    ("folder-channel-count", ["pretrain", *SMALL, "--set", "dataset.name=folder", "--set", "dataset.in_channels=2",
                              "--set", ("ART", "dataset.root={}", "corrupt"), *PRETRAIN_OUT],
     ["in_channels 2", "expected 1 (grayscale) or 3 (RGB)"]),
    ("truncated-checkpoint", ["search", *SMALL, "--weights", A("trunc.pt"), *SEARCH_OUT],
     ["trunc.pt", "truncated or corrupt"]),
    ("other-architecture-weights", ["search", *SMALL, "--weights", A("a1.pt"), *SEARCH_OUT],
     ["a1.pt", "has shape (8, 1, 3, 3), expected (6, 1, 3, 3)", "another architecture"]),
    ("pickle-not-weights", ["finetune", *SMALL, "--weights", A("notweights.pkl"), "--masks", A("a0_masks.json"),
                            *FINETUNE_OUT],
     ["notweights.pkl", "is not a weights file", "save model.state_dict()"]),
    ("missing-weights", ["search", *SMALL, "--weights", A("missing.pt"), *SEARCH_OUT],
     ["missing.pt", "not found"]),
    ("output-under-a-file", ["pretrain", *SMALL, "--out-weights", ("ART", "{}/w.pt", "afile.txt"),
                             "--out-metrics", "out/m.json"],
     ["afile.txt", "cannot be created"]),
    ("deploy-dir-under-a-file", ["deploy", *SMALL, "--weights", A("a0.pt"), "--masks", A("a0_masks.json"),
                                 "--out-dir", ("ART", "{}/deployed", "afile.txt")],
     ["afile.txt", "cannot be created"]),
    ("nan-loss", ["pretrain", *SMALL, "--set", "optim.lr=1e30", *PRETRAIN_OUT],
     ["loss became nan", "expected a finite loss", "lower the learning rate"]),
    ("learning-rate-zero", ["pretrain", *SMALL, "--set", "optim.lr=0", *PRETRAIN_OUT],
     ["lr must be a positive number", "got 0.0"]),
    ("malformed-masks", ["finetune", *SMALL, "--weights", A("a0.pt"), "--masks", A("bad_masks.json"), *FINETUNE_OUT],
     ["bad_masks.json", "is malformed", "expected the JSON written by pas search or pas prune"]),
    ("masks-without-masks", ["deploy", *SMALL, "--weights", A("a0.pt"), "--masks", A("nomasks.json"),
                             "--out-dir", "out/deployed"],
     ["nomasks.json", "is malformed", "'masks'"]),
    ("masks-of-another-backbone", ["finetune", *SMALL, "--weights", A("a0.pt"), "--masks", A("a1_masks.json"),
                                   *FINETUNE_OUT],
     ["a1_masks.json", "layer widths [8, 8, 16", "needs [6, 6, 12"]),
    ("missing-config", ["pretrain", "--config", "nope.yaml", *PRETRAIN_OUT],
     ["config file 'nope.yaml' does not exist"]),
    ("invalid-yaml", ["pretrain", "--config", A("bad.yaml"), *PRETRAIN_OUT],
     ["bad.yaml", "is not valid YAML/JSON"]),
    ("config-not-a-mapping", ["pretrain", "--config", A("list.yaml"), *PRETRAIN_OUT],
     ["list.yaml", "must hold a mapping", "got list"]),
    ("val-fraction-out-of-range", ["pretrain", *SMALL, "--set", "dataset.val_fraction=1.5", *PRETRAIN_OUT],
     ["val_fraction 1.5", "strictly between 0 and 1"]),
    ("evaluate-on-another-dataset", ["evaluate", *SMALL, "--set", "dataset.name=digits",
                                     "--arch", A("deployed/arch.json"), "--weights", A("deployed/model.safetensors"),
                                     "--out", "out/eval.json"],
     ["takes 1 channels/10 classes at 28x28", "'digits' has 1/10 at 8x8"]),
    ("tracking-store-under-a-file", ["pretrain", *SMALL, "--set", "tracking.enabled=true", "--set",
                                     ("ART", "tracking.uri=sqlite:///{}/mlflow.db", "afile.txt"), *PRETRAIN_OUT],
     ["MLflow store", "afile.txt/mlflow.db", "cannot be opened"]),
    ("tracking-init-store-under-a-file", ["tracking-init", "--uri", ("ART", "sqlite:///{}/mlflow.db", "afile.txt")],
     ["MLflow store", "afile.txt/mlflow.db", "cannot be created"]),
]


def _argv(argv, art: Path) -> list[str]:
    out = []
    for a in argv:
        if isinstance(a, tuple):
            a = str(art / a[1]) if len(a) == 2 else a[1].format(art / a[2])
        out.append(str(a))
    return out


def _declared_outputs(argv: list[str]) -> list[str]:
    flags = ("--out-weights", "--out-metrics", "--out-masks", "--out-history", "--out-dir", "--out")
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


SUBPROCESS_CASES = {"unknown-key", "corrupt-image-in-a-worker", "tracking-store-under-a-file", "nan-loss"}


def _run(argv, cwd):
    return subprocess.run([*PAS, *argv], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=180)


def _run_in_process(argv, cwd, monkeypatch, capfd) -> tuple[int, str]:
    from pas.cli import main
    monkeypatch.chdir(cwd)
    capfd.readouterr()
    rc = main(argv)
    return rc, capfd.readouterr().err


@pytest.mark.parametrize("case,argv,needles", [pytest.param(i, a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, argv, needles, art, tmp_path, monkeypatch, capfd):
    before = _files(art)
    argv = _argv(argv, art)
    if case in SUBPROCESS_CASES:
        r = _run(argv, tmp_path)
        rc, stderr = r.returncode, r.stderr
    else:
        rc, stderr = _run_in_process(argv, tmp_path, monkeypatch, capfd)
    assert rc == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("pas: error: ")
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    outputs = _declared_outputs(argv)
    assert not [o for o in outputs if (tmp_path / o).exists()], "a failed stage left a declared output"
    assert _files(tmp_path) == [], "a failed stage left files behind"  # no temp, state or run records
    assert _files(art) == before  # and wrote nothing next to its inputs


def test_cases_cover_the_brief():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(art, tmp_path):
    argv = ["--debug", "search", *SMALL, "--set", "search.target=lots", "--weights", str(art / "a0.pt"), *SEARCH_OUT]
    r = _run(argv, tmp_path)
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr
    assert "pas.errors.PasError: target 'lots' is not a MACs figure" in r.stderr
    assert "resolve_target" in r.stderr  # the frame that raised it
    assert _files(tmp_path) == []


def test_state_of_another_run_is_refused_in_one_line(art, tmp_path):
    """A resumable state left by a different backbone at the same output path: one line, not a key dump."""
    from pas.models import build
    (tmp_path / "out").mkdir()
    model = build("repvgg_a1_mini", num_classes=10, in_channels=1, resolution=28)
    torch.save({"epoch": 1, "model": model.state_dict(), "optimizer": {}, "history": [], "metrics": []},
               tmp_path / "out/.w.pt.state.pt")
    r = _run(["pretrain", *SMALL, *PRETRAIN_OUT], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pas: error: training state"), r.stderr
    assert "cannot be resumed" in lines[0] and "delete it to start over" in lines[0]
    assert len(lines[0]) < 600
    assert _files(tmp_path) == ["out/.w.pt.state.pt"]  # the state is kept, no output appears


def test_float_overrides_in_e_notation_are_numbers(art, tmp_path):
    """PyYAML reads '1e-3' as a string; a float key takes it as the number it is."""
    from pas.config import load_config
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-5", "search.alpha=1e1"])
    assert cfg["optim"]["lr"] == 1e-3 and cfg["optim"]["weight_decay"] == 5e-5 and cfg["search"]["alpha"] == 10.0
    assert load_config(None, ["search.target=2.5e5"])["search"]["target"] == "2.5e5"  # str allowed: kept
    with pytest.raises(Exception, match="'optim.lr' must be float, got '1e'"):
        load_config(None, ["optim.lr=1e"])
