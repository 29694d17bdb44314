"""DistributedDataParallel on CPU (gloo): `--nproc-per-node 2` from the shell, and the gradients of one
DDP step on a BN-free network against a single process on the same global batch."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

PAS = [sys.executable, "-m", "pas.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)
SMALL = ["--set", "backbone=repvgg_a0_mini", "--set", "dataset.max_train=256", "--set", "dataset.max_val=64",
         "--set", "threads=1", "--set", "batch_size=64", "--set", "epochs=2"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_pretrain_on_two_processes_writes_once(tmp_path):
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    subprocess.run([*PAS, "tracking-init", "--uri", uri, "--artifact-root", str(tmp_path / "art")],
                   check=True, capture_output=True, env=ENV)
    r = subprocess.run([*PAS, "pretrain", *SMALL, "--set", f"tracking.uri={uri}",
                        "--set", f"tracking.artifact_root={tmp_path / 'art'}", "--set", "sync_bn=true",
                        "--nproc-per-node", "2", "--out-weights", "out/w.pt", "--out-metrics", "out/m.json"],
                       cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    # only rank 0 logs, writes and tracks: each epoch line once, one MLflow run, the outputs once
    assert re.findall(r"^\[pretrain\] epoch (\d)/2", r.stderr, flags=re.M) == ["1", "2"]
    assert "Traceback" not in r.stderr and "OMP_NUM_THREADS" not in r.stderr
    assert _files(tmp_path / "out") == ["m.json", "m.run.json", "w.pt"]  # no state file, no temp files
    m = json.loads((tmp_path / "out/m.json").read_text())
    assert [row["epoch"] for row in m["history"]] == [1, 2]
    assert all(0 <= row["top1"] <= 100 and row["loss"] > 0 for row in m["history"])
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pas").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["stage"] == "pretrain" and runs[0].info.status == "FINISHED"
    assert [s.step for s in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]
    w = torch.load(tmp_path / "out/w.pt", weights_only=True)
    assert not [k for k in w if k.startswith("module.")]  # saved unwrapped, loadable by the next stage
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_bad_config_on_two_processes_fails_once(tmp_path):
    r = subprocess.run([*PAS, "pretrain", *SMALL, "--set", "epochs=ten", "--nproc-per-node", "2",
                        "--out-weights", "out/w.pt", "--out-metrics", "out/m.json"],
                       cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["pas: error: config key 'epochs' must be int, got 'ten'"]
    assert not (tmp_path / "out").exists()


# -- one DDP step == one single-process step on the same global batch ------------------------------

GLOBAL_BATCH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net():
    from pas.models import build
    torch.manual_seed(0)
    return build("repvgg_a0_mini", num_classes=10, in_channels=1, resolution=28, deploy=True)  # plain convs with bias: no BN, so no batch statistics


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def _one_step(world):
    """One SGD step of pas.engine.Trainer on this rank's contiguous share of the global batch."""
    from pas.engine import OptimConfig, Trainer
    model = _net()
    x, y = _batch()
    share = GLOBAL_BATCH // world.size
    xs, ys = x[world.rank * share:(world.rank + 1) * share], y[world.rank * share:(world.rank + 1) * share]
    trainer = Trainer(model, train_loader=lambda epoch: [(xs, ys)], epochs=1, world=world,
                      optim=OptimConfig(lr=0.5, momentum=0.9, weight_decay=1e-4, schedule="constant"))
    trainer.fit()
    return trainer, model


def _ddp_worker(rank: int, world_size: int, port: int, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pas.config import load_config
    from pas.stages import _data, _setup
    world = _setup(load_config(None, ["threads=1", "tracking.enabled=false"]))  # the stages' own set-up
    try:
        assert (world.rank, world.size) == (rank, world_size) and torch.distributed.is_initialized()
        trainer, model = _one_step(world)
        assert isinstance(trainer.net, torch.nn.parallel.DistributedDataParallel)
        # the stages' loaders shard one epoch between the ranks: half the global batch each, disjoint
        cfg = load_config(None, ["dataset.max_train=100", "dataset.max_val=10", "batch_size=20"])
        loader = _data(cfg, world)[0](3)
        torch.save({"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "indices": loader.indices.clone(), "batch": loader.batch_size, "steps": len(loader)},
                   f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_gradients_equal_single_process(tmp_path):
    from pas.engine import World
    port = _free_port()
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    single_trainer, single = _one_step(World())
    assert not isinstance(single_trainer.net, torch.nn.parallel.DistributedDataParallel)
    grads = {n: p.grad for n, p in single.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for r in ranks:
        assert sorted(r["grads"]) == sorted(grads)
        for n, g in grads.items():
            torch.testing.assert_close(r["grads"][n], g, atol=1e-6, rtol=0, msg=lambda m: f"grad {n}: {m}")
        for n, p in single.named_parameters():  # and so the same weights after the step, on both ranks
            torch.testing.assert_close(r["params"][n], p.detach(), atol=1e-6, rtol=0)
    # a half batch alone gives other gradients: the comparison above does see the all-reduce
    half = _net()
    x, y = _batch()
    torch.nn.functional.cross_entropy(half(x[:GLOBAL_BATCH // 2]), y[:GLOBAL_BATCH // 2]).backward()
    assert max(float((p.grad - grads[n]).abs().max()) for n, p in half.named_parameters()) > 1e-4

    # data sharding: per-rank batch = global batch / 2; the ranks' items are disjoint and cover the
    # (drop_last-truncated) epoch
    a, b = ranks[0]["indices"], ranks[1]["indices"]
    assert ranks[0]["batch"] == ranks[1]["batch"] == 10 and ranks[0]["steps"] == ranks[1]["steps"] == 5
    assert len(a) == len(b) == 50 and not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(100))


def test_launcher_strips_its_flag(monkeypatch):
    """A stage given --nproc-per-node re-runs the very command it was given (by pas.cli.main's
    argv, not sys.argv) under torchrun, without --nproc-per-node."""
    from pas import cli
    seen, nproc = {}, 2
    monkeypatch.setattr("torch.distributed.run.main", lambda argv: seen.setdefault("argv", argv))
    monkeypatch.setattr(sys, "argv", ["python", "-m", "pytest", "something else"])
    for form in (["--nproc-per-node", str(nproc)], [f"--nproc-per-node={nproc}"]):
        seen.clear()
        assert cli.main(["--debug", "pretrain", *form, "--set", "epochs=1", "--out-weights", "w.pt",
                         "--out-metrics", "m.json"]) == 0
        assert seen["argv"] == ["--standalone", f"--nproc-per-node={nproc}", "-m", "pas.cli", "--debug",
                                "pretrain", "--set", "epochs=1", "--out-weights", "w.pt", "--out-metrics", "m.json"]
