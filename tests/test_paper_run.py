"""config/paper.yaml run for real, not dry: the paper's network at its real size (RepVGG-B1 at
224 px) on a generated ImageNet-shaped folder (JPEGs of mixed sizes, 4 classes), starting from a
1000-class checkpoint under timm's names, on the CPU cores of this machine.

Overridden, and nothing else: the number of images, epochs and batch sizes (evaluate's latency
batch and repeats included), where the jobs run (no GPUs: one process per job, threads and loader
workers for 2 cores), and one variant out of the seven, PaS-A (every rule of the paper's DAG runs,
with every baseline and reference kind; the other variants repeat the same jobs on other targets or
on MobileNetV2, whose published MACs at 224 px tests/test_models.py checks, and whose search the
tiny run covers).
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


EXPECTED_ROWS = {("pas", "PaS-A"), ("full", "repvgg_b1"), ("scratch", "repvgg_a0"),
                 *((m, f"{m}@PaS-A") for m in ("uniform", "bn_gamma", "l1"))}


def overrides(data: Path, checkpoint: Path) -> dict:
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    variants = [v for v in paper["variants"] if v["name"] == "PaS-A"]
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
    assert set(rows) == EXPECTED_ROWS
    assert int(float(rows[("full", "repvgg_b1")]["macs_ptflops"])) == B1_MACS
    for (method, model), row in rows.items():
        assert 0 <= float(row["top1"]) <= 100
        # ptflops' count of the deployed network: the table's MACs, within 1% of PaS-A's 1.36 G
        counted = int(float(row["macs_ptflops"]))
        assert counted == int(float(row["macs"])), (method, model)
        if method not in ("full", "scratch"):
            assert abs(counted / 1.36e9 - 1) < 0.01, (method, model, counted)


def test_the_imagenet_checkpoint_loads_with_a_new_classifier(paper_run):
    log = (paper_run / "results" / "seed0" / "pretrain" / "repvgg_b1" / "logs" / "pretrain.log").read_text()
    assert "the checkpoint has 1000 classes, the data 4" in log
    metrics = json.loads((paper_run / "results" / "seed0" / "pretrain" / "repvgg_b1" / "metrics.json").read_text())
    assert len(metrics["history"]) == 1  # the new classifier was trained for pretrain.epochs


def test_the_cluster_mode_store_holds_every_run(paper_run):
    """tracking.mode ingest (the paper config's): the jobs wrote records, one local job replayed them
    into a run per record under a parent run per table row, and registered PaS-A's deployed network."""
    records = list((paper_run / "results").rglob("*.run.json")) + list((paper_run / "results").rglob("run.json"))
    with sqlite3.connect(paper_run / "results" / "mlflow.db") as db:
        def count(query):
            return db.execute(query).fetchone()[0]
        children = count("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                         "where t.key = 'pas_record' and r.status = 'FINISHED'")
        parents = count("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                        "where t.key = 'pas_parent' and r.status = 'FINISHED'")
        tagged = count("select count(*) from tags where key = 'import.new_classifier' and value = 'fc'")
        versions = db.execute("select name, version from model_versions").fetchall()
    assert children == len(records) > 0
    assert parents == len(EXPECTED_ROWS)
    assert tagged == 1
    assert versions == [("PaS-A", 1)]
