"""Two runs of a stage on one machine give bit-identical weights, masks and metrics; every training
run records what would make another machine's numbers differ (pas.machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

PAS = [sys.executable, "-m", "pas.cli"]
SMALL = ["--set", "backbone=mobilenetv2_mini_035", "--set", "dataset.max_train=64", "--set", "dataset.max_val=32",
         "--set", "threads=1", "--set", "batch_size=16", "--set", "epochs=2", "--set", "tracking.enabled=false",
         "--set", "search.target=60%"]


def _stage(args, cwd):
    done = subprocess.run([*PAS, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_two_searches_give_bit_identical_weights_and_record_the_machine(tmp_path):
    from pas.models import build
    torch.manual_seed(3)
    start = tmp_path / "start.pt"
    torch.save(build("mobilenetv2_mini_035", num_classes=10, in_channels=1, resolution=28).state_dict(), start)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        _stage(["search", *SMALL, "--weights", str(start), "--out-weights", "w.pt", "--out-masks", "masks.json",
                "--out-history", "history.json", "--out-metrics", "metrics.json"], out)
        runs.append(out)
    a, b = (torch.load(r / "w.pt", weights_only=True) for r in runs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (runs[0] / "masks.json").read_text() == (runs[1] / "masks.json").read_text()
    history = [json.loads((r / "history.json").read_text()) for r in runs]
    assert history[0] == history[1]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    machine = metrics["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == 1 and machine["torch"] == torch.__version__
    masks = json.loads((runs[0] / "masks.json").read_text())
    assert masks["objective"] == "constraint" and masks["floor"] == 0.1
    assert masks["kept_fractions"] == [round(w / f, 6) for w, f in zip(masks["widths"], masks["full_widths"])]
    assert min(masks["kept_fractions"]) >= 0.1
    # the run record MLflow gets (directly, or ingested from it): the machine's tags, the fractions
    record = json.loads((runs[0] / "metrics.run.json").read_text())
    assert record["tags"]["machine.cpu_capability"] == machine["cpu_capability"]
    logged = {k: v for row in record["metrics"] for k, v in row["values"].items()}
    assert logged["kept_fraction_min"] == min(masks["kept_fractions"])
    assert [logged[f"kept_fraction_{i:02d}"] for i in range(len(masks["widths"]))] == masks["kept_fractions"]
