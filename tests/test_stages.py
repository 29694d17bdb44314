"""The stage subcommands from the shell: the whole chain on animal_mnist subsets, resume after kill -9,
MLflow runs, and eight concurrent writers to one SQLite store.

Every stage runs as `python -m pas.cli ...` in a subprocess, exactly as a workflow would call it.
"""
from __future__ import annotations

import functools
import getpass
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pas.compact import compact
from pas.flops import ptflops_macs
from pas.gates import set_masks
from pas.models import arch_for, build
from tests.helpers import rel_err

pytestmark = pytest.mark.slow  # every test here runs stages as subprocesses

PAS = [sys.executable, "-m", "pas.cli"]
BACKBONE = "repvgg_a0_mini"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STATE = re.compile(r"^\..*\.state\.pt$")

# Shared by every stage here: small, single-threaded, deterministic, no MLflow.
CONFIG = textwrap.dedent(f"""\
    backbone: {BACKBONE}
    seed: 0
    threads: 1
    deterministic: true
    batch_size: 64
    dataset: {{name: animal_mnist, max_train: 256, max_val: 128}}
    optim: {{lr: 0.05}}
    search: {{target: 50%, history_every: 2}}
    evaluate: {{repeats: 3, warmup: 1}}
    tracking: {{enabled: false}}
    """)


def pas(*args, cwd, timeout=300, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([*PAS, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"pas {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}")
    return r


def files(folder: Path) -> list[str]:
    """Every file under `folder`, hidden ones included, relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def arch():
    return arch_for(BACKBONE, num_classes=10, in_channels=1, resolution=28)


def load(path: Path):
    return json.loads(Path(path).read_text())


def network(masks=None, weights=None) -> torch.nn.Module:
    """The training-form network of the chain in eval mode, with a stage's weights and masks if given."""
    model = build(BACKBONE, num_classes=10, in_channels=1, resolution=28)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    if masks is not None:
        set_masks(model, [torch.tensor(m, dtype=torch.bool) for m in masks])
    return model.eval()


def counted(masks) -> int:
    """ptflops' MACs of the compact network these masks give: a count independent of pas's formula."""
    return ptflops_macs(compact(network(masks)).eval(), 1, 28)


@functools.cache
def full_macs() -> int:
    """ptflops' MACs of the full deployed network."""
    return ptflops_macs(build(BACKBONE, num_classes=10, in_channels=1, resolution=28, deploy=True), 1, 28)


# -- the chain: pretrain -> search -> finetune -> deploy -> evaluate, and the baseline pruners ---

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    (d / "cfg.yaml").write_text(CONFIG)
    c = ["--config", "cfg.yaml"]
    pas("pretrain", *c, "--set", "epochs=2", "--out-weights", "pre/w.pt", "--out-metrics", "pre/m.json", cwd=d)
    pas("search", *c, "--set", "epochs=2", "--weights", "pre/w.pt", "--out-weights", "search/w.pt",
        "--out-masks", "search/masks.json", "--out-history", "search/history.json",
        "--out-metrics", "search/m.json", cwd=d)
    pas("finetune", *c, "--set", "epochs=1", "--weights", "search/w.pt", "--masks", "search/masks.json",
        "--out-weights", "ft/w.pt", "--out-metrics", "ft/m.json", cwd=d)
    pas("deploy", *c, "--weights", "ft/w.pt", "--masks", "search/masks.json", "--out-dir", "deployed", cwd=d)
    pas("evaluate", *c, "--arch", "deployed/arch.json", "--weights", "deployed/model.safetensors",
        "--out", "eval/eval.json", cwd=d)
    return d


def test_search_masks_land_on_target(chain):
    m = load(chain / "search/masks.json")
    a = arch()
    full = full_macs()
    assert m["full_macs"] == full and m["full_widths"] == a.searchable_widths()
    assert m["target_macs"] == round(0.5 * full)
    # the compact network of the masks, counted by ptflops, has the record's MACs: within 1% below the target
    assert counted(m["masks"]) == m["macs"]
    assert 0.99 * m["target_macs"] <= m["macs"] <= m["target_macs"]
    assert m["widths"] == [sum(x) for x in m["masks"]]
    assert [len(x) for x in m["masks"]] == a.searchable_widths()
    assert all(w >= 1 for w in m["widths"])
    assert m["method"] == "pas"
    # where the search ended before the landing, and what the landing moved to reach the target
    assert m["search_macs_before_landing"] == m["searched_macs"] and m["channel_multiple"] == 1
    assert m["landing_moved_macs_share"] == pytest.approx(abs(m["macs"] - m["searched_macs"]) / full)
    assert 0 <= m["landing_moved_channels"] <= sum(a.searchable_widths())


def test_search_history_records_widths_and_macs(chain):
    h = load(chain / "search/history.json")
    a = arch()
    assert h["full_widths"] == a.searchable_widths() and h["layers"] == len(a.searchable_widths())
    recs = h["records"]
    # 256 images / batch 64 = 4 steps per epoch, history_every 2: steps 0 and 2 of each of 2 epochs
    assert [(r["epoch"], r["step"]) for r in recs] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    assert [r["record"] for r in recs] == list(range(len(recs)))
    for r in recs:
        assert len(r["kept"]) == len(a.searchable_widths())
        assert all(1 <= k <= w for k, w in zip(r["kept"], a.searchable_widths()))
        # the gated MACs are those of a compact network of the kept widths, as ptflops counts it
        assert r["macs"] == counted([[1] * k + [0] * (w - k) for k, w in zip(r["kept"], a.searchable_widths())])
    assert recs[0]["kept"] == a.searchable_widths()  # gates start fully on


def test_finetune_keeps_the_masks_macs(chain):
    masks = load(chain / "search/masks.json")
    ft = load(chain / "ft/m.json")
    assert ft["macs"] == counted(masks["masks"])
    assert [r["epoch"] for r in ft["history"]] == [1]
    assert 0 <= ft["final_top1"] <= 100


def test_deploy_is_exact_and_compact(chain):
    """The deployed files against the fine-tuned masked network they come from: onnxruntime on
    model.onnx and PyTorch on model.safetensors compute its outputs; ptflops and the module's own
    parameter count give the recorded MACs and params."""
    import onnxruntime as ort

    from pas.deploy import load_deployed
    dep = load(chain / "deployed/deploy.json")
    masks = load(chain / "search/masks.json")
    assert dep["onnx_max_abs_err"] is not None, "onnxruntime is installed: the ONNX check must run"
    masked = network(masks["masks"], chain / "ft/w.pt")
    plain = load_deployed(chain / "deployed/arch.json", chain / "deployed/model.safetensors")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(chain / "deployed/model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = masked(x)
        assert rel_err(reference, plain(x)) <= 1e-4
    assert rel_err(reference, torch.from_numpy(session.run(None, {"input": x.numpy()})[0])) <= 1e-4
    assert dep["macs"] == ptflops_macs(plain, 1, 28) == masks["macs"] and dep["widths"] == masks["widths"]
    assert dep["params"] == sum(p.numel() for p in plain.parameters())
    assert load(chain / "deployed/arch.json")["widths"] == masks["widths"]


def test_evaluate_counts_and_latency(chain):
    ev = load(chain / "eval/eval.json")
    masks = load(chain / "search/masks.json")
    assert ev["macs"] == ev["macs_ptflops"] == masks["macs"]
    assert 0 <= ev["top1"] <= 100 and ev["top1"] <= ev["top5"] <= 100
    assert sorted(k for k in ev if k.startswith(("latency_", "throughput_"))) == [
        "latency_ms_cpu_b1", "latency_ms_cpu_b64", "throughput_cpu_b1", "throughput_cpu_b64"]
    assert ev["backbone"] == BACKBONE and ev["widths"] == masks["widths"]
    # where the latency was measured: CPU model, threads, GPU (none here)
    assert ev["machine"]["threads"] == ev["threads"] and ev["machine"]["cpus"] >= 1
    assert ev["machine"]["gpu"] is None and "cpu" in ev["machine"]
    # evaluating the finetuned (masked) network and the deployed one give the same accuracy
    ft = load(chain / "ft/m.json")
    assert ev["top1"] == pytest.approx(ft["final_top1"], abs=100 / 128 + 1e-9)  # at most one image apart


def test_pretrain_metrics(chain):
    m = load(chain / "pre/m.json")
    assert [r["epoch"] for r in m["history"]] == [1, 2]
    assert m["macs"] == full_macs()
    assert m["final_top1"] == m["history"][-1]["top1"]
    assert all(0 <= r["top1"] <= 100 and r["loss"] > 0 for r in m["history"])


def test_only_declared_outputs_and_no_state_left(chain):
    # run records (*.run.json, Tracker's plain mirror of the MLflow run) sit beside each stage's output
    assert files(chain / "pre") == ["m.json", "m.run.json", "w.pt"]
    assert files(chain / "search") == ["history.json", "m.json", "m.run.json", "masks.json", "w.pt"]
    assert files(chain / "ft") == ["m.json", "m.run.json", "w.pt"]
    assert files(chain / "deployed") == ["arch.json", "deploy.json", "model.onnx", "model.safetensors", "run.json"]
    assert files(chain / "eval") == ["eval.json", "eval.run.json"]
    assert not [p for p in files(chain) if STATE.match(Path(p).name) or p.endswith(".tmp")]
    # the saved weights are the training form without gates (masks travel in masks.json)
    w = torch.load(chain / "search/w.pt", weights_only=True)
    assert not [k for k in w if ".gate." in k] and "fc.weight" in w


@pytest.mark.parametrize("method", ["uniform", "bn_gamma", "l1"])
def test_prune_baselines_land_on_target(chain, method, tmp_path):
    out = tmp_path / f"{method}.json"
    pas("prune", "--config", chain / "cfg.yaml", "--set", f"search.method={method}",
        "--weights", chain / "pre/w.pt", "--out-masks", out, cwd=tmp_path)
    m = load(out)
    assert m["method"] == method
    assert m["target_macs"] == load(chain / "search/masks.json")["target_macs"]
    assert counted(m["masks"]) == m["macs"] and 0.99 * m["target_macs"] <= m["macs"] <= m["target_macs"]
    assert m["widths"] == [sum(x) for x in m["masks"]]
    assert files(tmp_path) == [f"{method}.json", f"{method}.run.json"]
    if method == "uniform":  # one width factor for all layers: every layer keeps about half
        ratios = [w / f for w, f in zip(m["widths"], m["full_widths"])]
        assert max(ratios[2:]) - min(ratios[2:]) <= 0.25
        # the uniform widths are the method's decision: below the target, moved up by the landing
        assert m["search_macs_before_landing"] <= m["macs"]
    else:  # a global ranking is carried out by the landing itself: nothing to compare with
        assert m["search_macs_before_landing"] is m["landing_moved_channels"] is m["landing_moved_macs_share"] is None


def test_prune_widths_are_multiples_of_search_channel_multiple(chain, tmp_path):
    """repvgg_a0_mini's widths 6, 6, 12, 12, 24, 24, 24, 160 with channel_multiple 4: 4 or 6 (its full
    width), 4, 8 or 12, ... ; the config key reaches the pruner through the stage."""
    out = tmp_path / "uniform.json"
    pas("prune", "--config", chain / "cfg.yaml", "--set", "search.method=uniform", "--set", "search.channel_multiple=4",
        "--weights", chain / "pre/w.pt", "--out-masks", out, cwd=tmp_path)
    m = load(out)
    assert m["channel_multiple"] == 4 and 0.99 * m["target_macs"] <= counted(m["masks"]) <= m["target_macs"]
    assert all(w % 4 == 0 or w == f for w, f in zip(m["widths"], m["full_widths"])), m["widths"]
    bad = pas("prune", "--config", chain / "cfg.yaml", "--set", "search.channel_multiple=0", "--weights",
              chain / "pre/w.pt", "--out-masks", out, cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert bad.stderr == "pas: error: config key 'search.channel_multiple' must be >= 1, got 0\n"


def test_search_and_prune_to_a_latency_budget(chain, tmp_path):
    """A measured table, PaS and uniform to a budget in ms (halfway between the narrowest and the full
    network's predicted latency: a tiny network's range depends on the machine) through the stages:
    masks.json says what the budget was and what the table predicts for the landed widths (recomputed
    by scipy's interpolation of the table's grid), and the table shows both."""
    from pas.landing import WidthRule
    from pas.latency_table import LatencyTable
    from tests.test_latency_table import oracle
    pas("latency-table", "--backbone", BACKBONE, "--resolution", 28, "--num-classes", 10, "--in-channels", 1,
        "--points", 3, "--rounds", 2, "--warmup", 0, "--runtime", "pytorch", "--batch", 8, "--out", "t.json",
        cwd=tmp_path)
    table = LatencyTable.load(tmp_path / "t.json")
    full = oracle(table, arch().full_widths(), 1, 10)
    # the narrowest widths the search may take: every group at its floor (search.floor, default 0.1)
    target = (full + oracle(table, WidthRule(arch(), floor=0.1).minimum(), 1, 10)) / 2
    budget = ["--set", f"search.target={target:.6f}ms", "--set", f"search.latency_table={tmp_path / 't.json'}",
              "--set", "search.tolerance=0.02"]
    pas("search", "--config", chain / "cfg.yaml", *budget, "--set", "epochs=1", "--weights", chain / "pre/w.pt",
        "--out-weights", "s/w.pt", "--out-masks", "s/masks.json", "--out-history", "s/h.json",
        "--out-metrics", "s/m.json", cwd=tmp_path)
    pas("prune", "--config", chain / "cfg.yaml", *budget, "--set", "search.method=uniform",
        "--weights", chain / "pre/w.pt", "--out-masks", "u.json", cwd=tmp_path)
    for path in ("s/masks.json", "u.json"):
        m = load(tmp_path / path)
        assert m["target_macs"] is None and m["target_latency_ms"] == pytest.approx(target, abs=1e-6)
        assert m["latency_table"]["batch"] == 8 and m["latency_table"]["runtime"] == "pytorch"
        predicted = oracle(table, m["widths"], 1, 10)
        assert m["predicted_latency_ms"] == pytest.approx(predicted)
        assert 0.98 * m["target_latency_ms"] <= predicted <= m["target_latency_ms"]
        assert counted(m["masks"]) == m["macs"]
    from pas.tables import landing_values
    assert landing_values(load(tmp_path / "u.json"))["predicted_latency_ms"] == pytest.approx(
        oracle(table, load(tmp_path / "u.json")["widths"], 1, 10))


# -- resume after kill -9 ------------------------------------------------------------------------

RESUME = ["--config", "cfg.yaml", "--set", "dataset.max_train=1024", "--set", "epochs=4"]


def _run_killed(cmd: list, cwd: Path, state: Path, outputs: list[Path]) -> int:
    """Start `cmd`, kill -9 it once its state file records epoch >= 1; return the epoch saved by then."""
    p = subprocess.Popen([*PAS, *map(str, cmd)], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    epoch, deadline = 0, time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if state.exists():
                try:
                    epoch = int(torch.load(state, weights_only=True)["epoch"])
                except (OSError, EOFError, RuntimeError):
                    epoch = 0  # replaced while we read it: look again
                if epoch >= 1:
                    break
            assert p.poll() is None, f"the run ended (rc {p.returncode}) before it could be killed"
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be killed; make its epochs longer"
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not [o for o in outputs if o.exists()], "a killed run left declared outputs"
    # another epoch may have ended between our look and the kill: the file says where it stands
    saved = torch.load(state, weights_only=True)
    done = int(saved["epoch"])
    assert epoch <= done < 4, (epoch, done)
    assert [r["epoch"] for r in saved["metrics"]] == list(range(1, done + 1))  # whole epochs only
    return done


def _epochs_logged(stderr: str, stage: str) -> list[int]:
    return [int(m) for m in re.findall(rf"^\[{stage}\] epoch (\d+)/", stderr, flags=re.M)]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sorted(wa) == sorted(wb)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def _strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


def test_pretrain_resumes_after_kill_to_identical_weights(tmp_path):
    for run in ("killed", "straight"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "cfg.yaml").write_text(CONFIG)
    cmd = ["pretrain", *RESUME, "--out-weights", "out/w.pt", "--out-metrics", "out/m.json"]
    straight = pas(*cmd, cwd=tmp_path / "straight")
    assert _epochs_logged(straight.stderr, "pretrain") == [1, 2, 3, 4]

    k = tmp_path / "killed"
    done = _run_killed(cmd, k, k / "out/.w.pt.state.pt", [k / "out/w.pt", k / "out/m.json", k / "out/m.run.json"])
    resumed = pas(*cmd, cwd=k)
    assert f"resuming after epoch {done}/4" in resumed.stderr
    assert _epochs_logged(resumed.stderr, "pretrain") == list(range(done + 1, 5))  # no epoch twice

    _same_weights(k / "out/w.pt", tmp_path / "straight/out/w.pt")
    mk, ms = load(k / "out/m.json"), load(tmp_path / "straight/out/m.json")
    assert [r["epoch"] for r in mk["history"]] == [1, 2, 3, 4]
    assert _strip_times(mk["history"]) == _strip_times(ms["history"])
    assert not (k / "out/.w.pt.state.pt").exists()


def test_a_state_left_by_another_config_is_not_resumed(tmp_path):
    """A killed run's training state is resumed only by the same stage config and inputs: after a
    config edit (here the learning rate) the job starts over; a key that does not change results
    (threads) keeps it."""
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    cmd = ["pretrain", *RESUME, "--out-weights", "out/w.pt", "--out-metrics", "out/m.json"]
    state = tmp_path / "out/.w.pt.state.pt"
    _run_killed(cmd, tmp_path, state, [tmp_path / "out/w.pt"])
    edited = pas(*cmd, "--set", "optim.lr=0.02", cwd=tmp_path)
    assert f"training state '{state.relative_to(tmp_path)}' was written for another configuration or input; " \
           "starting over" in edited.stderr
    assert "resuming" not in edited.stderr and _epochs_logged(edited.stderr, "pretrain") == [1, 2, 3, 4]
    from pas.engine import OptimConfig
    # the last step of epoch 1 of 4 (16 steps each) on the cosine schedule from the edited lr
    assert load(tmp_path / "out/m.json")["history"][0]["lr"] == pytest.approx(OptimConfig(lr=0.02).lr_at(0, 15, 16, 4))

    (tmp_path / "out/w.pt").unlink()
    done = _run_killed(cmd, tmp_path, state, [tmp_path / "out/w.pt"])
    other_threads = pas(*cmd, "--set", "threads=2", cwd=tmp_path)
    assert f"resuming after epoch {done}/4" in other_threads.stderr


def test_search_resumes_after_kill_to_identical_masks_and_history(chain, tmp_path):
    for run in ("killed", "straight"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "cfg.yaml").write_text(CONFIG)
    cmd = ["search", *RESUME, "--set", "search.history_every=5", "--weights", chain / "pre/w.pt",
           "--out-weights", "out/w.pt", "--out-masks", "out/masks.json", "--out-history", "out/history.json",
           "--out-metrics", "out/m.json"]
    straight = pas(*cmd, cwd=tmp_path / "straight")
    assert _epochs_logged(straight.stderr, "search") == [1, 2, 3, 4]

    k = tmp_path / "killed"
    outs = [k / "out" / n for n in ("w.pt", "masks.json", "history.json", "m.json", "m.run.json")]
    done = _run_killed(cmd, k, k / "out/.w.pt.state.pt", outs)
    resumed = pas(*cmd, cwd=k)
    assert f"resuming after epoch {done}/4" in resumed.stderr
    assert _epochs_logged(resumed.stderr, "search") == list(range(done + 1, 5))

    s = tmp_path / "straight"
    _same_weights(k / "out/w.pt", s / "out/w.pt")
    assert load(k / "out/masks.json") == load(s / "out/masks.json")
    hk, hs = load(k / "out/history.json"), load(s / "out/history.json")
    assert hk == hs
    # 1024 images / 64 = 16 steps per epoch, every 5th step recorded: steps 0, 5, 10, 15 of each epoch
    assert [(r["epoch"], r["step"]) for r in hk["records"]] == [(e, st) for e in range(1, 5) for st in (0, 5, 10, 15)]
    assert [r["record"] for r in hk["records"]] == list(range(16))
    mk, ms = load(k / "out/m.json"), load(s / "out/m.json")
    assert [r["epoch"] for r in mk["history"]] == [1, 2, 3, 4]
    assert _strip_times(mk["history"]) == _strip_times(ms["history"])
    assert not (k / "out/.w.pt.state.pt").exists()


# -- MLflow ----------------------------------------------------------------------------------------

def test_mlflow_runs_tags_metrics_params_artifacts(tmp_path):
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    exp_id = pas("tracking-init", "--uri", uri, "--artifact-root", tmp_path / "art", cwd=tmp_path).stdout.strip()
    track = ["--config", "cfg.yaml", "--set", "tracking.enabled=true", "--set", f"tracking.uri={uri}",
             "--set", f"tracking.artifact_root={tmp_path / 'art'}", "--set", "tags.variant=x", "--set", "epochs=2"]
    pas("pretrain", *track, "--out-weights", "pre/w.pt", "--out-metrics", "pre/m.json", cwd=tmp_path)
    pas("search", *track, "--weights", "pre/w.pt", "--out-weights", "s/w.pt", "--out-masks", "s/masks.json",
        "--out-history", "s/history.json", "--out-metrics", "s/m.json", cwd=tmp_path)

    client = mlflow.MlflowClient(uri)
    assert client.get_experiment_by_name("pas").experiment_id == exp_id
    # opened in the UI on its training runs, not in the GenAI (traces) view
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    everything = client.search_runs([exp_id])
    runs = [r for r in everything if "stage" in r.data.tags]
    assert sorted(r.data.tags["stage"] for r in runs) == ["pretrain", "search"]  # one run per stage
    # the search is a child of network x's parent run and names the pretraining it started from
    (parent,) = [r for r in everything if "stage" not in r.data.tags]
    search_tags = next(r.data.tags for r in runs if r.data.tags["stage"] == "search")
    pretrain_id = next(r.info.run_id for r in runs if r.data.tags["stage"] == "pretrain")
    assert parent.info.run_name == "x seed0" and search_tags["mlflow.parentRunId"] == parent.info.run_id
    assert search_tags["pretrain_run_id"] == search_tags["input_run_id"] == pretrain_id
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    by_stage = {}
    for r in runs:
        t = r.data.tags
        assert t["backbone"] == BACKBONE and t["seed"] == "0" and t["variant"] == "x"
        assert t["git_commit"] == commit and t["host"] == socket.gethostname()
        # the standard tags the MLflow UI shows: its Git column, source, user, description
        assert t["mlflow.source.git.commit"] == commit and t["mlflow.source.name"] == f"pas {t['stage']}"
        assert t["mlflow.user"] == getpass.getuser() and "seed 0" in t["mlflow.note.content"]
        assert r.info.run_name == f"x seed0/{t['stage']}" and r.info.status == "FINISHED"
        assert r.data.params["optim.lr"] == "0.05" and r.data.params["epochs"] == "2"
        assert r.data.params["backbone"] == BACKBONE
        by_stage[t["stage"]] = r

    def history(run, key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    for stage, folder in (("pretrain", "pre"), ("search", "s")):
        run, rows = by_stage[stage], load(tmp_path / folder / "m.json")["history"]
        for key in ("loss", "top1", "lr", "val_loss"):  # per epoch, the values of the metrics file
            assert history(run, key) == [(r["epoch"], pytest.approx(r[key])) for r in rows], (stage, key)

    search = by_stage["search"]
    masks = load(tmp_path / "s/masks.json")
    sm = load(tmp_path / "s/m.json")
    assert [s for s, _ in history(search, "macs")][:2] == [1, 2]
    assert history(search, "macs")[:2] == [(r["epoch"], pytest.approx(r["macs"])) for r in sm["history"]]
    n = len(arch().searchable_widths())
    for i in range(n):
        kept = history(search, f"kept_{i:02d}")
        assert [s for s, _ in kept] == [1, 2, 3]  # every epoch, then the final target-adjusted widths
        assert kept[-1][1] == masks["widths"][i]
        assert all(1 <= v <= arch().searchable_widths()[i] for _, v in kept)
    assert search.data.metrics["target_macs"] == masks["target_macs"]
    for key in ("search_macs_before_landing", "landing_moved_channels", "landing_moved_macs_share"):
        assert search.data.metrics[key] == pytest.approx(masks[key]), key
    assert f"kept_{n:02d}" not in search.data.metrics

    art = {a.path for a in client.list_artifacts(search.info.run_id)}
    assert {"masks.json", "history.json", "m.json"} <= art
    local = Path(client.download_artifacts(search.info.run_id, "masks.json", str(tmp_path / "dl")))
    assert load(local) == masks
    assert "m.json" in {a.path for a in client.list_artifacts(by_stage["pretrain"].info.run_id)}
    assert "kept_00" not in by_stage["pretrain"].data.metrics


WRITER = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    import mlflow  # imported before the barrier, so that the writers really write at the same time
    from pas.config import load_config
    from pas.tracking import Tracker
    i, uri, root, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    Path(f"ready-{i}").touch()
    while not Path("go").exists():
        time.sleep(0.01)
    cfg = load_config(None, [f"tracking.uri={uri}", f"tracking.artifact_root={root}", f"seed={i}",
                             f"tags.writer={i}", "backbone=repvgg_a0_mini"])
    t = Tracker(cfg, stage="stress", run_name=f"writer-{i}")
    for step in range(n):
        t.metrics({"value": i * 1000 + step, "square": step * step}, step=step)
    t.finish(True)
    print(t.run_id)
    """)


def test_eight_concurrent_writers_to_one_sqlite_store(tmp_path):
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = pas("tracking-init", "--uri", uri, "--artifact-root", tmp_path / "art", cwd=tmp_path).stdout.strip()
    (tmp_path / "writer.py").write_text(WRITER)
    n_writers, n_steps = 8, 100
    procs = [subprocess.Popen([sys.executable, "writer.py", str(i), uri, str(tmp_path / "art"), str(n_steps)],
                              cwd=tmp_path, env={**ENV, "PYTHONPATH": str(Path(__file__).parents[1])},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n_writers)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready-*"))) < n_writers and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    (tmp_path / "go").touch()  # all eight create their runs and log their metrics from now on
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    failures = [(i, rc, err[-2000:]) for i, (rc, _, err) in enumerate(results) if rc != 0]
    assert not failures, failures

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([exp_id], max_results=100)
    assert len(runs) == n_writers
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip() for _, out, _ in results)
    for r in runs:
        i = int(r.data.tags["writer"])
        assert r.info.status == "FINISHED" and r.info.run_name == f"writer-{i}" and r.data.params["seed"] == str(i)
        values = client.get_metric_history(r.info.run_id, "value")
        assert sorted((m.step, m.value) for m in values) == [(s, i * 1000 + s) for s in range(n_steps)]
        squares = client.get_metric_history(r.info.run_id, "square")
        assert sorted((m.step, m.value) for m in squares) == [(s, s * s) for s in range(n_steps)]
