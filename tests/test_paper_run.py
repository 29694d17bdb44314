"""config/paper.yaml run for real, not dry: the paper's networks at their real size (RepVGG-B1 and
MobileNetV2 1.0 at 224 px) on a generated ImageNet-shaped folder (JPEGs of mixed sizes, 4 classes),
RepVGG-B1 starting from a 1000-class checkpoint under timm's names, on the CPU cores of this
machine.

Overridden, and nothing else: the number of images, epochs and batch sizes (evaluate's latency
batch and repeats included), where the jobs run (no GPUs: one process per job, threads and loader
workers for 2 cores), and one RepVGG and one MobileNetV2 variant out of the seven (every rule of the
paper's DAG runs, with every baseline and reference kind; the other variants repeat the same jobs).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import imagenet_folder
from tests.slurm_cluster import run_in_own_group

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
CLASSES = 4
TIMEOUT_S = 1200

pytestmark = [pytest.mark.slow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")]

# The paper's published MACs at 224 px with 1000 classes, minus the classifier's share at 4 classes.
B1_MACS = 11_815_485_440 - 2048 * (1000 - CLASSES)     # RepVGG-B1: 11.8 G (RepVGG paper, Table 2)
MBV2_MACS = 300_774_272 - 1280 * (1000 - CLASSES)       # MobileNetV2 1.0: 300 M (MobileNetV2 paper)


def overrides(data: Path, checkpoint: Path) -> dict:
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    variants = [v for v in paper["variants"] if v["name"] in ("PaS-A", "PaS-light-A")]
    return {
        "dataset": {"root": str(data)},
        "pretrain": {"epochs": 1, "batch_size": 4, "weights": {"repvgg_b1": str(checkpoint), "resnet50": None}},
        "search": {"epochs": 1, "batch_size": 4, "history_every": 1},
        "finetune": {"epochs": 1, "batch_size": 4},
        "evaluate": {"batch_sizes": [1], "repeats": 2, "warmup": 1, "threads": 1},
        "training": {"workers": 1, "sync_bn": False},
        # one thread per job: two jobs side by side on 2 cores (most jobs are short, start-up bound)
        "resources": {"train": {"gpus": 0, "threads": 1, "mem_mb": 8000},
                      "light": {"threads": 1, "mem_mb": 4000}},
        "variants": variants,
        "references": {"full": True, "scratch": ["repvgg_a0"]},
    }


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory) -> Path:
    import timm
    import torch

    work = tmp_path_factory.mktemp("paper_run")
    data = imagenet_folder(work / "imagenet", CLASSES, 3, 2)
    checkpoint = work / "repvgg_b1_in1k_timm.pth"
    torch.save(timm.create_model("repvgg_b1", pretrained=False, num_classes=1000).state_dict(), checkpoint)
    (work / "reduced.yaml").write_text(yaml.safe_dump(overrides(data, checkpoint)))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), "--cores", "2",
           "--configfile", str(ROOT / "config" / "paper.yaml"), str(work / "reduced.yaml")]
    t0 = time.perf_counter()
    result = run_in_own_group(cmd, timeout=TIMEOUT_S, env=env, cwd=work)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-1500:]}" for p in work.glob("results/**/logs/*.log"))
        pytest.fail(f"paper run failed (rc {result.returncode}):\n{result.stderr[-4000:]}\n{logs[-6000:]}")
    print(f"reduced paper run: {wall:.0f} s")
    return work


def test_every_row_of_the_paper_table_is_measured(paper_run):
    with open(paper_run / "results" / "tables" / "main.csv", newline="") as f:
        rows = {(r["method"], r["model"]): r for r in csv.DictReader(f)}
    expected = {("pas", "PaS-A"), ("pas", "PaS-light-A"), ("full", "repvgg_b1"), ("full", "mobilenetv2_100"),
                ("scratch", "repvgg_a0")}
    expected |= {(m, f"{m}@{v}") for m in ("uniform", "bn_gamma", "l1") for v in ("PaS-A", "PaS-light-A")}
    assert set(rows) == expected
    assert int(float(rows[("full", "repvgg_b1")]["macs"])) == B1_MACS
    assert int(float(rows[("full", "mobilenetv2_100")]["macs"])) == MBV2_MACS
    for (method, model), row in rows.items():
        assert 0 <= float(row["top1"]) <= 100
        if method not in ("full", "scratch"):
            target = {"PaS-A": 1.36e9, "PaS-light-A": 0.097e9}[model.split("@")[-1]]
            assert abs(float(row["macs"]) / target - 1) < 0.01, (method, model, row["macs"])


def test_the_imagenet_checkpoint_loads_with_a_new_classifier(paper_run):
    log = (paper_run / "results" / "seed0" / "pretrain" / "repvgg_b1" / "logs" / "pretrain.log").read_text()
    assert "the checkpoint has 1000 classes, the data 4" in log
    metrics = json.loads((paper_run / "results" / "seed0" / "pretrain" / "repvgg_b1" / "metrics.json").read_text())
    assert len(metrics["history"]) == 1  # the new classifier was trained for pretrain.epochs


def test_the_cluster_mode_store_holds_every_run(paper_run):
    """tracking.mode ingest (the paper config's): the jobs wrote records, one local job replayed them."""
    records = list((paper_run / "results").rglob("*.run.json")) + list((paper_run / "results").rglob("run.json"))
    with sqlite3.connect(paper_run / "results" / "mlflow.db") as db:
        runs = db.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
        tagged = db.execute("select count(*) from tags where key = 'import.new_classifier' and value = 'fc'").fetchone()[0]
    assert runs == len(records) > 0
    assert tagged == 1
