"""The Snakemake workflow, run for real: the tiny config's whole DAG once (module fixture), then
numbers from its table, plots, MLflow store (directly and through `mlflow server`'s REST API);
`--lint`; a dry run of the paper config; reruns after a config edit; bad configs stopped before
any job with one line naming the key.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

import pas.models
from pas.flops import ptflops_macs
from tests.slurm_cluster import kill_group, run_in_own_group
from pas.search import resolve_target

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
TINY = ROOT / "config" / "test.yaml"
DEFAULT = ROOT / "config" / "config.yaml"  # `configfile:` is relative to the working directory
TINY_SHAPE = dict(num_classes=10, in_channels=1, resolution=28)  # animal-mnist
STAGES = ("pretrain", "search", "prune", "finetune", "deploy", "evaluate")
PLOTS = ("widths", "accuracy_latency", "accuracy_macs", "gates", "search_macs")
SCRATCH = ("scratch", "scratch_long")  # trained from scratch: the backbones' schedule, PaS's total epochs
REFERENCES = ("full", *SCRATCH)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")]


def snakemake(workdir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real snakemake on the repository's Snakefile, working in `workdir`; `pas` first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]
    return run_in_own_group(cmd, timeout=timeout, env=env, cwd=workdir)


def run_whole_dag(workdir: Path, configfile: Path, what: str) -> None:
    """A config's whole DAG run with 2 cores in `workdir`; a failure shows snakemake's and the jobs' logs."""
    result = snakemake(workdir, "--configfile", str(configfile), "--cores", "2", timeout=1200)
    if result.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-1500:]}" for p in workdir.glob("results/**/logs/*.log"))
        pytest.fail(f"{what} run failed (rc {result.returncode}):\n{result.stderr[-4000:]}\n{logs[-6000:]}")


def main_table(workdir: Path) -> list[dict]:
    """The rows of a run's results/tables/main.csv."""
    with open(workdir / "results" / "tables" / "main.csv", newline="") as f:
        return list(csv.DictReader(f))


def shell_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of a `snakemake -n -p` run, each job's command without Snakemake's prefix."""
    return [line.removeprefix("Shell command: ") for line in result.stdout.splitlines()]


def tiny_config() -> dict:
    return yaml.safe_load(TINY.read_text())


def expected_rows(cfg: dict) -> set[tuple[str, str]]:
    """(method, model column) of every table row the tiny config asks for."""
    rows = {("pas", v["name"]) for v in cfg["variants"]}
    rows |= {(m, f"{m}@{v['name']}") for m in cfg["baselines"]["methods"] for v in cfg["variants"]}
    rows |= {("full", b) for b in dict.fromkeys(v["backbone"] for v in cfg["variants"])}
    rows |= {("scratch", n) for n in cfg["references"]["scratch"]}
    if cfg["references"].get("scratch_long", True):
        epochs = sum(cfg[s]["epochs"] for s in ("pretrain", "search", "finetune"))
        rows |= {("scratch_long", f"{n}-{epochs}ep") for n in cfg["references"]["scratch"]}
    return rows


def dry_run_jobs(output: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a dry run (-n) lists."""
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", output, re.M):
        wc = re.search(r"^    wildcards: (.*)$", m.group(2), re.M)
        pairs = dict(p.split("=", 1) for p in wc.group(1).split(", ")) if wc else {}
        jobs.append((m.group(1), pairs))
    return jobs


def job_inputs(output: str) -> list[tuple[str, list[str]]]:
    """(rule, input files) of every job a dry run (-n) lists."""
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", output, re.M):
        inputs = re.search(r"^    input: (.*)$", m.group(2), re.M)
        jobs.append((m.group(1), inputs.group(1).split(", ") if inputs else []))
    return jobs


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run."""
    table = output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
            if m.group(1) != "total"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny config's whole DAG, run once with 2 cores; the working directory it ran in."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    t0 = time.perf_counter()
    run_whole_dag(workdir, TINY, "tiny")
    wall = time.perf_counter() - t0
    (workdir / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    return workdir


@pytest.fixture(scope="module")
def table(tiny_run) -> list[dict]:
    return main_table(tiny_run)


# -- the tiny run's results ------------------------------------------------------------------

def test_table_has_one_row_per_method_and_network(tiny_run, table):
    assert len(table) == len(expected_rows(tiny_config()))
    assert {(r["method"], r["model"]) for r in table} == expected_rows(tiny_config())
    md = (tiny_run / "results" / "tables" / "main.md").read_text().splitlines()
    tex = (tiny_run / "results" / "tables" / "main.tex").read_text()
    assert sum(1 for line in md if line.startswith("| ") and "---" not in line) == len(table) + 1  # + heading
    assert tex.count("\\\\") == len(table) + 1
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex


def test_targets_match_the_config_and_achieved_macs_are_within_one_percent(table):
    cfg = tiny_config()
    targets = {v["name"]: (v["backbone"], v["target"]) for v in cfg["variants"]}
    pruned = [r for r in table if r["method"] not in REFERENCES]
    assert len(pruned) == len(targets) * (1 + len(cfg["baselines"]["methods"]))
    for r in pruned:
        backbone, target = targets[r["model"].split("@")[-1]]
        assert r["backbone"] == backbone
        arch = pas.models.arch_for(backbone, **TINY_SHAPE)
        expected = resolve_target(target, arch)
        assert int(float(r["target_macs"])) == expected
        # ptflops' count of the deployed network is the table's MACs, within 1% below the target
        macs = int(float(r["macs"]))
        assert int(float(r["macs_ptflops"])) == macs and expected * 0.99 <= macs <= expected, r
        # and a network built from the row's widths, counted by ptflops, has them
        widths = [int(w) for w in r["widths"].split()]
        assert ptflops_macs(pas.models.build_deployed(arch.with_widths(widths)), 1, 28) == macs, r


def test_reference_rows_are_the_full_networks(table):
    for r in table:
        if r["method"] in REFERENCES:
            arch = pas.models.arch_for(r["backbone"], **TINY_SHAPE)
            plain = pas.models.build_deployed(arch)  # counted by ptflops and by the module itself
            assert int(float(r["macs"])) == int(float(r["macs_ptflops"])) == ptflops_macs(plain, 1, 28)
            assert int(float(r["params"])) == sum(p.numel() for p in plain.parameters())
            assert [int(w) for w in r["widths"].split()] == arch.searchable_widths()
            assert r["target_macs"] == ""


def test_accuracy_and_wall_times_are_in_range_and_latency_is_the_latency_jobs(tiny_run, table):
    """Every row's latencies are what the one latency job measured for that network (PyTorch and
    ONNX Runtime, each batch size), and that job ran alone: Snakemake started no other job while it
    ran, and it started after every other job before it had finished."""
    timed = json.loads((tiny_run / "results" / "latency" / "latency.json").read_text())
    by_name = {(t["model"], t["runtime"], t["batch"]): t for t in timed["rows"]}
    assert timed["machine"]["threads"] == 1 and timed["rounds"] == tiny_config()["evaluate"]["repeats"]
    for r in table:
        top1, top5 = float(r["top1"]), float(r["top5"])
        assert 0.0 <= top1 <= top5 <= 100.0
        assert r["latency_device"] == "cpu"
        # the workflow's model: a variant (a baseline's row names it after the @), a reference's network
        model = r["backbone"] if r["method"] in REFERENCES else r["model"].split("@")[-1]
        name = f"seed{r['seed'] or 0}/{r['method']}/{model}"
        for b in (1, 64):
            assert float(r[f"latency_ms_b{b}"]) == pytest.approx(by_name[(name, "pytorch", b)]["latency_ms"])
            assert float(r[f"ort_latency_ms_b{b}"]) == pytest.approx(by_name[(name, "onnxruntime", b)]["latency_ms"])
        assert float(r["finetune_s"] or r["train_s"]) > 0
        if r["method"] == "pas":
            assert float(r["search_s"]) > 0
    (log,) = (tiny_run / ".snakemake" / "log").glob("*.snakemake.log")
    events = re.findall(r"^(?:local)?rule (\w+):$|^Finished jobid: \d+ \(Rule: (\w+)\)$", log.read_text(), re.M)
    events = [("start", a) if a else ("end", b) for a, b in events]
    i = events.index(("start", "latency"))
    started_before = [rule for kind, rule in events[:i] if kind == "start"]
    ended_before = [rule for kind, rule in events[:i] if kind == "end"]
    assert sorted(started_before) == sorted(ended_before)  # nothing else running when it started
    assert events[i + 1] == ("end", "latency")  # and nothing started before it ended


def test_evidence_summarises_the_table_and_the_masks(tiny_run, table):
    """results/evidence from the tiny run (one seed): the accuracy table repeats the table's top-1 per
    method and target, the width profile is the masks' kept/full channels per feature-map side, and
    claims.md states every claim with a verdict."""
    with open(tiny_run / "results" / "evidence" / "accuracy.csv", newline="") as f:
        acc = list(csv.DictReader(f))
    assert len(acc) == len(table)
    top1 = {(r["method"], r["model"].split("@")[-1]): float(r["top1"]) for r in table}
    for r in acc:
        assert r["seeds"] == "1" and r["top1_std"] == ""
        assert float(r["top1_mean"]) == float(r["top1_min"]) == float(r["top1_max"]) == top1[(r["method"], r["model"])]
    with open(tiny_run / "results" / "evidence" / "width_profile.csv", newline="") as f:
        profile = list(csv.DictReader(f))
    masks = json.loads((tiny_run / "results" / "seed0" / "models" / "l1" / "PaS-A" / "masks.json").read_text())
    sides = sorted(set(masks["layer_sizes"]), reverse=True)
    mine = [r for r in profile if r["model"] == "PaS-A" and r["method"] == "l1"]
    assert [int(r["resolution"]) for r in mine] == sides
    for r, side in zip(mine, sides):
        kept = sum(w for w, s in zip(masks["widths"], masks["layer_sizes"]) if s == side)
        full = sum(w for w, s in zip(masks["full_widths"], masks["layer_sizes"]) if s == side)
        assert float(r["keep_mean"]) == round(kept / full, 4)
    claims = (tiny_run / "results" / "evidence" / "claims.md").read_text()
    assert claims.count("**Verdict: ") == 3 and "(1 seed)" in claims
    png = (tiny_run / "results" / "evidence" / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_plots_are_written_as_png_and_pdf(tiny_run):
    for name in PLOTS:
        png = (tiny_run / "results" / "plots" / f"{name}.png").read_bytes()
        pdf = (tiny_run / "results" / "plots" / f"{name}.pdf").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert pdf.startswith(b"%PDF") and len(pdf) > 2000


def test_every_rule_logged_and_benchmarked(tiny_run):
    for log in tiny_run.glob("results/**/logs/*.log"):
        assert "Traceback" not in log.read_text(), log
    benchmarks = list(tiny_run.glob("results/**/logs/*.benchmark.tsv"))
    # every job but `all`: tracking_init 1, pretrain 2, train_scratch 2 (scratch, scratch_long), search 2,
    # prune 6, full_masks 4, finetune 10 (8 pruned, 2 full), reparameterize 12, evaluate 12, latency 1,
    # tables 1, plots 1, evidence 1
    assert len(benchmarks) == 55
    for b in benchmarks:
        header, row = b.read_text().splitlines()[:2]
        assert header.split("\t")[0] == "s" and float(row.split("\t")[0]) >= 0


def _store(tiny_run):
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_run / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pas")
    return client, exp, client.search_runs([exp.experiment_id], max_results=1000)


def test_mlflow_has_one_run_per_stage_and_network(tiny_run):
    client, exp, runs = _store(tiny_run)
    by_stage: dict[str, list] = {}
    for run in runs:
        if "stage" in run.data.tags:
            by_stage.setdefault(run.data.tags["stage"], []).append(run)
    cfg = tiny_config()
    rows = expected_rows(cfg)
    n_variants, n_methods = len(cfg["variants"]), len(cfg["baselines"]["methods"])
    assert {s: len(v) for s, v in by_stage.items()} == {
        "pretrain": 2 + 2 * len(cfg["references"]["scratch"]), "search": n_variants,
        "prune": n_variants * n_methods, "finetune": n_variants * (1 + n_methods) + 2,  # + the 2 full rows
        "deploy": len(rows), "evaluate": len(rows)}
    assert all(run.info.status == "FINISHED" for run in runs)
    for run in by_stage["evaluate"]:
        tags = run.data.tags
        d = tiny_run / "results" / "seed0" / "models" / tags["method"] / tags["model"]
        result = json.loads((d / "eval.json").read_text())
        assert run.data.metrics["top1"] == pytest.approx(result["top1"])
        assert run.data.metrics["macs"] == result["macs"]
    for run in by_stage["search"]:
        masks = json.loads((tiny_run / "results" / "seed0" / "models" / "pas" / run.data.tags["model"] / "search" /
                            "masks.json").read_text())
        assert run.data.metrics["target_macs"] == masks["target_macs"] >= masks["macs"]
        assert run.data.metrics["macs"] == masks["macs"]  # the final masks', not the last epoch's gated MACs


def test_mlflow_nests_each_networks_stages_under_one_parent_run(tiny_run):
    """One parent run per table row (network and seed) holding its stages; the backbones'
    pretraining runs stand alone and every stage that starts from one names it; the parent shows
    the evaluation's metrics."""
    client, _, runs = _store(tiny_run)
    by_id = {r.info.run_id: r for r in runs}
    parents = {r.info.run_id: r for r in runs if "stage" not in r.data.tags}
    rows = expected_rows(tiny_config())
    assert sorted((p.data.tags["method"], p.data.tags["variant"]) for p in parents.values()) == sorted(rows)
    assert all(p.info.status == "FINISHED" and p.info.run_name.startswith(f"{p.data.tags['variant']} seed0")
               for p in parents.values())
    pretrained = {r.data.tags["backbone"]: r.info.run_id for r in runs
                  if r.data.tags.get("stage") == "pretrain" and r.data.tags["method"] == "pretrain"}
    assert len(pretrained) == 2
    for run in runs:
        tags = run.data.tags
        if "stage" not in tags or tags["method"] == "pretrain":
            assert "mlflow.parentRunId" not in tags
            continue
        parent = parents[tags["mlflow.parentRunId"]]
        assert (parent.data.tags["variant"], parent.data.tags["method"]) == (tags["variant"], tags["method"])
        assert run.info.run_name == f"{tags['variant']} seed0/{tags['stage']}"
        if tags["method"] not in SCRATCH:  # everything else starts, through its stages, from a pretraining
            assert tags["pretrain_run_id"] == pretrained[tags["backbone"]], run.info.run_name
        if tags["stage"] == "evaluate":
            assert parent.data.metrics["top1"] == run.data.metrics["top1"]
            assert by_id[tags["input_run_id"]].data.tags["stage"] == "deploy"


def test_pas_variants_are_registered_models_that_load_back(tiny_run):
    """Each PaS variant is a registered model (ONNX flavour) whose version 1 loads through MLflow
    (`models:/PaS-A/1`, onnxruntime underneath) and gives the compact PyTorch network's outputs;
    the evaluation's metrics are linked to the model."""
    import mlflow
    from pas.deploy import load_deployed
    client, exp, _ = _store(tiny_run)
    names = sorted(m.name for m in client.search_registered_models())
    assert names == sorted(v["name"] for v in tiny_config()["variants"])
    mlflow.set_tracking_uri(client.tracking_uri)
    for name in names:
        (version,) = client.search_model_versions(f"name = '{name}'")
        assert version.tags["seed"] == "0"
        logged = client.get_logged_model(version.source.rsplit("/", 1)[-1])  # models:/<model id>
        assert {m.key for m in logged.metrics} >= {"top1", "macs"}
        d = tiny_run / "results" / "seed0" / "models" / "pas" / name / "deploy"
        torch_net = load_deployed(d / "arch.json", d / "model.safetensors").eval()
        a = torch_net.arch
        x = np.random.default_rng(1).standard_normal((3, a.in_channels, a.resolution, a.resolution)).astype(np.float32)
        loaded = mlflow.pyfunc.load_model(f"models:/{name}/1")
        ours = loaded.predict({"input": x})["logits"]
        import torch
        with torch.no_grad():
            reference = torch_net(torch.from_numpy(x)).numpy()
        assert np.abs(ours - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())
        meta = loaded.metadata.metadata
        assert meta["arch"] == json.loads((d / "arch.json").read_text()) and len(meta["normalization"]["mean"]) == 1


def test_a_second_run_has_nothing_to_do(tiny_run):
    result = snakemake(tiny_run, "-n", "--configfile", str(TINY), "--cores", "2")
    assert result.returncode == 0, result.stderr
    assert dry_run_jobs(result.stdout + result.stderr) == []


def test_changing_one_target_reruns_only_that_variants_jobs(tiny_run):
    cfg = tiny_config()
    cfg["variants"][0]["target"] = "40%"
    edited = tiny_run / "edited.yaml"
    edited.write_text(yaml.safe_dump(cfg, sort_keys=True))  # key order differs from test.yaml: no change
    result = snakemake(tiny_run, "-n", "--configfile", str(edited), "--cores", "2")
    assert result.returncode == 0, result.stderr
    jobs = dry_run_jobs(result.stdout + result.stderr)
    name = cfg["variants"][0]["name"]
    per_model = sorted(rule for rule, wc in jobs if wc)
    n = len(cfg["baselines"]["methods"])
    # its search, its baselines' masks at the new target, and everything downstream of them
    assert per_model == sorted(["search"] + ["prune"] * n + ["finetune", "reparameterize", "evaluate"] * (1 + n))
    assert {wc["model"] for _, wc in jobs if wc} == {name}
    # and the one latency job, which times every network side by side again
    assert sorted(rule for rule, wc in jobs if not wc) == ["all", "evidence", "latency", "plots", "tables"]


def test_report_is_one_html_file(tiny_run):
    report = tiny_run / "results" / "report.html"
    result = snakemake(tiny_run, "--configfile", str(TINY), "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    html = report.read_text(errors="replace")
    assert len(html) > 100_000 and "main.csv" in html and "accuracy_latency.png" in html


def test_mlflow_server_serves_runs_models_and_artifacts_of_a_moved_store(tiny_run, tmp_path):
    """The store and its artifacts copied elsewhere (results/ moved) and served by `mlflow server
    --serve-artifacts`: through the REST API, every stage's run with its metrics under its
    network's parent run, the registered PaS variants with their versions, and an artifact
    downloaded over HTTP byte for byte."""
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy2(tiny_run / "results" / "mlflow.db", moved / "mlflow.db")
    shutil.copytree(tiny_run / "results" / "mlflow-artifacts", moved / "mlflow-artifacts")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{moved / 'mlflow.db'}", "--serve-artifacts", "--artifacts-destination",
                               str(moved / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              start_new_session=True)  # the server and its workers: one group to stop
    base = f"http://127.0.0.1:{port}"

    def call(path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server not ready after 60 s"
                time.sleep(0.5)
        exp = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=pas")["experiment"]
        runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                    "max_results": 1000})["runs"]
        tags_of = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        parents = {i for i, t in tags_of.items() if "stage" not in t}
        assert len(parents) == len(expected_rows(tiny_config()))
        expected_metric = {"pretrain": "final_top1", "search": "target_macs", "prune": "macs",
                           "finetune": "final_top1", "deploy": "macs", "evaluate": "top1"}
        seen = set()
        for run in runs:
            tags = tags_of[run["info"]["run_id"]]
            if "stage" not in tags:
                continue
            seen.add(tags["stage"])
            metrics = {m["key"] for m in run["data"].get("metrics", [])}
            assert expected_metric[tags["stage"]] in metrics, (tags["stage"], sorted(metrics))
            if tags["method"] != "pretrain":
                assert tags["mlflow.parentRunId"] in parents
        assert seen == set(STAGES)

        models = call("/api/2.0/mlflow/registered-models/search?max_results=100")["registered_models"]
        assert sorted(m["name"] for m in models) == sorted(v["name"] for v in tiny_config()["variants"])
        for m in models:
            versions = call(f"/api/2.0/mlflow/model-versions/search?filter=name%3D%27{m['name']}%27")["model_versions"]
            assert [v["version"] for v in versions] == ["1"]
            assert tags_of[versions[0]["run_id"]]["stage"] == "deploy"

        # an artifact of a PaS variant's evaluation, over HTTP from the moved folder
        run_id = next(i for i, t in tags_of.items() if t.get("stage") == "evaluate" and t["method"] == "pas")
        local = tiny_run / "results" / "seed0" / "models" / "pas" / tags_of[run_id]["model"] / "eval.json"
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow-artifacts/artifacts/{run_id}/artifacts/eval.json",
                                    timeout=10) as r:
            assert r.read() == local.read_bytes()
    finally:
        kill_group(server, grace_s=20)


# -- without running jobs --------------------------------------------------------------------

def test_schema_defaults_are_the_default_config():
    from snakemake.utils import validate
    filled: dict = {}
    validate(filled, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    assert filled == yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_lint_passes(tmp_path):
    result = snakemake(tmp_path, "--lint", "--configfile", str(DEFAULT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_dag(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(DEFAULT))
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout) == {
        "tracking_init": 1, "pretrain": 2, "search": 6, "prune": 18, "finetune": 26, "full_masks": 6,
        "train_scratch": 4, "reparameterize": 30, "evaluate": 30, "latency": 1, "tables": 1, "plots": 1,
        "evidence": 1, "all": 1}


def test_penalty_config_searches_each_variant_with_both_gradients_and_one_baseline(tmp_path):
    """config/penalty.yaml: every default variant twice (penalty_gradient both and, as NAME-output,
    output), the uniform baseline only for the `both` ones (baselines: false), three seeds."""
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(DEFAULT), str(ROOT / "config" / "penalty.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    shells = shell_lines(result)
    searches = [line for line in shells if line.startswith("pas search")]
    assert len(searches) == 12 * 3
    for line in searches:
        (variant,) = re.findall(r"variant: ([\w.-]+)\}", line)
        expected = "output" if variant.endswith("-output") else "both"
        assert f"--set search.penalty_gradient={expected} " in line, line
    prunes = re.findall(r"variant: (uniform@[\w.-]+)\}", "\n".join(l for l in shells if l.startswith("pas prune")))
    assert sorted(set(prunes)) == sorted(f"uniform@{n}" for n in
                                         ("PaS-A", "PaS-B", "PaS-C", "PaS-light-A", "PaS-light-B", "PaS-light-C"))
    assert len(prunes) == 6 * 3


def test_objective_config_searches_each_variant_with_both_objectives(tmp_path):
    """config/objective.yaml: every default variant twice (objective constraint and, as NAME-paper,
    paper), the baselines only for the constraint ones, three seeds."""
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(DEFAULT), str(ROOT / "config" / "objective.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    shells = shell_lines(result)
    searches = [line for line in shells if line.startswith("pas search")]
    assert len(searches) == 12 * 3
    for line in searches:
        (variant,) = re.findall(r"variant: ([\w.-]+)\}", line)
        expected = "paper" if variant.endswith("-paper") else "constraint"
        assert f"--set search.objective={expected} " in line and "--set search.floor=0.1 " in line, line
    prunes = re.findall(r"variant: (\w+@[\w.-]+)\}", "\n".join(l for l in shells if l.startswith("pas prune")))
    assert len(prunes) == 3 * 6 * 3 and not any(p.endswith("-paper") for p in prunes)


def test_aligned_config_searches_each_variant_at_its_own_channel_multiple(tmp_path):
    """config/aligned.yaml: every default variant twice (channel_multiple 1 and, as NAME-x8, 8 with a
    2% tolerance), three seeds; a variant's own channel_multiple and tolerance reach its baselines."""
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(DEFAULT), str(ROOT / "config" / "aligned.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    shells = shell_lines(result)
    searches = [line for line in shells if line.startswith("pas search")]
    assert len(searches) == 12 * 3
    for line in searches:
        (variant,) = re.findall(r"variant: ([\w.-]+)\}", line)
        multiple, tolerance = ("8", "0.02") if variant.endswith("-x8") else ("1", "0.01")
        assert f"--set search.channel_multiple={multiple} " in line and f"--set search.tolerance={tolerance} " in line
    prunes = re.findall(r"variant: (uniform@[\w.-]+)\}", "\n".join(l for l in shells if l.startswith("pas prune")))
    assert len(prunes) == 6 * 3 and not any(p.endswith("-x8") for p in prunes)

    own = tmp_path / "own.yaml"
    own.write_text("baselines: {methods: [uniform, l1]}\nreferences: {scratch: []}\n"
                   "variants: [{name: A8, backbone: repvgg_b0_mini, target: 516544, channel_multiple: 8, "
                   "tolerance: 0.03}]\n")
    (tmp_path / "own").mkdir()
    result = snakemake(tmp_path / "own", "-n", "-p", "--configfile", str(DEFAULT), str(own))
    assert result.returncode == 0, result.stdout + result.stderr
    shells = shell_lines(result)
    pruned = [line for line in shells if line.startswith("pas prune") and "@A8" in line]
    assert len(pruned) == 2, pruned  # uniform and l1
    for line in pruned + [line for line in shells if line.startswith("pas search")]:
        assert "--set search.channel_multiple=8 " in line and "--set search.tolerance=0.03 " in line, line


def test_latency_config_measures_one_table_per_backbone_before_its_latency_searches(tmp_path):
    """config/latency.yaml: a latency_table job per backbone with a latency variant; those variants'
    search and prune jobs read it, the MACs variants do not."""
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(DEFAULT), str(ROOT / "config" / "latency.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts["latency_table"] == 2 and counts["search"] == 4 and counts["prune"] == 12
    shells = shell_lines(result)
    shells = [line for line in shells if line.startswith(("pas search", "pas prune"))]
    assert len(shells) == counts["search"] + counts["prune"] + counts["full_masks"]  # full_masks: pas prune too
    reads = {"repvgg": "--set search.latency_table=results/latency_tables/repvgg_b0_mini.json",
             "mobilenet": "--set search.latency_table=results/latency_tables/mobilenetv2_mini_035.json"}
    for line in shells:
        latency = "-latency," in line  # the variant's tag
        assert ("--set 'search.target=78% latency'" in line or "--set 'search.target=69% latency'" in line) \
            == latency, line
        assert any(flag in line for flag in reads.values()) == latency, line
    assert "pas latency-table --backbone repvgg_b0_mini --resolution 28 --num-classes 10 --in-channels 1" \
        in result.stdout and "--batch 64" in result.stdout


def test_latency_study_over_seeds_runs_only_the_searches_and_the_full_networks(tmp_path):
    """config/latency.yaml + evidence.yaml + latency_evidence.yaml: 3 seeds of the 4 searches and the
    2 full backbones, no baselines, no scratch members; tables on multiples of 8 like the searches."""
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(DEFAULT), *(str(ROOT / "config" / f) for f in (
        "latency.yaml", "evidence.yaml", "latency_evidence.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts["search"] == 12 and counts["full_masks"] == 6 and counts["finetune"] == 18
    assert "prune" not in counts and "train_scratch" not in counts and counts["latency_table"] == 2
    tables = [line for line in shell_lines(result) if line.startswith("pas latency-table")]
    assert len(tables) == 2 and all("--channel-multiple 8" in line for line in tables)


def test_paper_config_dry_run_needs_no_data(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(ROOT / "config" / "paper.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    # 28 pruned networks and the 3 full backbones fine-tuned; no scratch_long rows (paper.yaml turns them off)
    assert counts["search"] == 7 and counts["finetune"] == 31 and counts["train_scratch"] == 5
    assert "--set dataset.name=imagenet" in result.stdout and "--nproc-per-node 8" in result.stdout
    assert "--import /path/to/RepVGG-B1-train.pth" in result.stdout
    # the ResNet-50 rows: searched to 2.0 G with the snapshot's ResNet alpha, torchvision's weights
    assert "--import /path/to/resnet50-0676ba61.pth" in result.stdout
    assert "--set search.alpha=84.0" in result.stdout and "--set search.target=2.0G" in result.stdout
    # a cluster: jobs write run records only, one local job replays them into MLflow at the end
    assert counts["tracking_ingest"] == 1 and "tracking_init" not in counts
    assert "--set tracking.enabled=false" in result.stdout and "--set tracking.enabled=true" not in result.stdout
    # ImageNet is checked once, before every job that loads it from scratch
    assert counts["check_data"] == 1
    assert "pas check-data --set dataset.bad_images=stop --set dataset.name=imagenet" in result.stdout
    first = {"pretrain", "train_scratch", "full_masks"}
    waiting = [inputs for rule, inputs in job_inputs(result.stdout) if rule in first]
    assert len(waiting) == counts["pretrain"] + counts["train_scratch"] + counts["full_masks"]
    assert all("results/data/check.json" in inputs for inputs in waiting)
    assert "--set dataset.bad_images_report=results/data/check.json" in result.stdout


def test_in_memory_dry_run_has_no_data_check(tmp_path):
    """The embedded dataset gets no check_data job and no new flag (its jobs' params are unchanged)."""
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(TINY))
    assert result.returncode == 0, result.stderr
    assert "check_data" not in job_counts(result.stdout) and "bad_images" not in result.stdout
    assert all("results/data/check.json" not in inputs for _, inputs in job_inputs(result.stdout))


def _image_folder(root: Path, broken: bool) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(root / split / c / f"{i}.jpg")
    if broken:
        (root / "train" / "b" / "empty.jpg").write_bytes(b"")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_check_data_job_stops_or_lets_training_skip(tmp_path, policy):
    """A real check_data job on a folder with one empty file: stop fails it and its log names the
    file; skip writes the report the training jobs then read."""
    _image_folder(tmp_path / "images", broken=True)
    cfg = tiny_config()
    cfg["dataset"] = {"name": "folder", "root": str(tmp_path / "images"), "resize": 28, "in_channels": 1,
                      "bad_images": policy}
    (tmp_path / "folder.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "--configfile", str(tmp_path / "folder.yaml"), "--cores", "1",
                       "results/data/check.json")
    log = (tmp_path / "results/data/logs/check_data.log").read_text()
    assert "unreadable: train/b/empty.jpg (empty file)" in log
    if policy == "stop":
        assert result.returncode != 0 and not (tmp_path / "results/data/check.json").exists()
        assert "pas: error: 1 of 19 images cannot be read" in log
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads((tmp_path / "results/data/check.json").read_text())
        assert [b["path"] for b in report["bad"]] == ["train/b/empty.jpg"]
        dry = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "folder.yaml"))
        assert dry.returncode == 0 and "check_data" not in job_counts(dry.stdout)  # done: not rerun
        assert "--set dataset.bad_images=skip" in dry.stdout


def test_every_seed_runs_the_whole_pipeline(tmp_path):
    """training.seeds: every job but the summaries once per seed, under results/seed<N>/, each
    stage told its seed; one table, one set of figures, one evidence summary over all seeds."""
    cfg = tiny_config()
    cfg["training"] = {"seeds": [0, 7]}
    (tmp_path / "seeds.yaml").write_text(yaml.safe_dump(cfg))
    one = job_counts(snakemake(tmp_path, "-n", "--configfile", str(TINY)).stdout)
    result = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "seeds.yaml"))
    assert result.returncode == 0, result.stderr
    two = job_counts(result.stdout)
    once = {"tracking_init", "latency", "tables", "plots", "evidence", "all"}
    assert {r: n for r, n in two.items() if r not in once} == {r: 2 * n for r, n in one.items() if r not in once}
    assert {r: two[r] for r in once} == {r: 1 for r in once}
    jobs = dry_run_jobs(result.stdout)
    assert {wc["seed"] for _, wc in jobs if wc} == {"0", "7"}
    assert "--set seed=7" in result.stdout and "results/seed7/models/pas/PaS-A/search/masks.json" in result.stdout
    assert re.search(r"tags=\{method: pas, model: PaS-A, seed: \S*7\S*, target: ", result.stdout)  # MLflow tag

def _bad(cfg_edit) -> dict:
    cfg = copy.deepcopy(tiny_config())
    cfg_edit(cfg)
    return cfg


def _set(path, value):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key] if isinstance(node, list) else node.setdefault(key, {})
        node[path[-1]] = value
    return edit


BAD_CONFIGS = {
    "variants[0].backbone": _set(["variants", 0, "backbone"], "resnet9000"),
    "variants[1].target": _set(["variants", 1, "target"], "2M"),  # mobilenetv2_mini_035: 1.55M
    "variants[1].name": _set(["variants", 1, "name"], "PaS-A"),
    "dataset.root": lambda cfg: cfg["dataset"].update(name="cifar10", root="/nonexistent/cifar"),
    "finetune.epochs": _set(["finetune", "epochs"], "ten"),
    "search.alhpa": _set(["search", "alhpa"], 1.0),
    "references.scratch[0]": _set(["references", "scratch"], ["resnet9000"]),
    "pretrain.epochs": _set(["pretrain", "epochs"], -1),
    "training.seeds": _set(["training", "seeds"], [0, 0]),
    "training.seeds[0]": _set(["training", "seeds"], [-3]),
    "tracking.mode": _set(["tracking", "mode"], "sometimes"),
    "dataset.name": _set(["dataset", "name"], "mnist-fashion"),
    "variants[0].target": _set(["variants", 0, "target"], "0%"),
}


@pytest.mark.parametrize("key", sorted(BAD_CONFIGS))
def test_bad_config_stops_before_any_job_naming_the_key(tmp_path, key):
    cfg = _bad(BAD_CONFIGS[key])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "--configfile", str(path), "--cores", "1", timeout=120)  # a real run
    out = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and errors[0].startswith(f"config error: {key}: "), out[-2000:]
    assert "Traceback" not in out and "Error in rule" not in out
    assert not (tmp_path / "results").exists()  # no job ran
