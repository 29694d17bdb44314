"""MLflow from plain files: run records are replayed into the store, and rebuild it when deleted."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow

PAS = [sys.executable, "-m", "pas.cli"]


def _runs(uri):
    """The stages' runs (not the networks' parent runs)."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("pas")
    return client, [r for r in client.search_runs([exp.experiment_id]) if "stage" in r.data.tags]


def test_records_rebuild_the_store(tmp_path):
    common = ["--set", "backbone=repvgg_a0_mini", "--set", "dataset.max_train=500", "--set", "dataset.max_val=200",
              "--set", "tracking.enabled=false", "--set", "tags.variant=u40", "--set", "search.target=40%"]
    w = tmp_path / "pre.pt"
    subprocess.run([*PAS, "pretrain", *common, "--set", "epochs=1", "--out-weights", str(w),
                    "--out-metrics", str(tmp_path / "pre.json")], check=True, capture_output=True)
    subprocess.run([*PAS, "prune", *common, "--set", "search.method=uniform", "--weights", str(w),
                    "--out-masks", str(tmp_path / "u.json")], check=True, capture_output=True)
    record = json.loads((tmp_path / "pre.run.json").read_text())
    assert record["tags"]["stage"] == "pretrain" and record["params"]["optim.lr"] == "0.1"
    assert not (tmp_path / "mlflow.db").exists()  # tracking off: files only

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    ingest = [*PAS, "tracking-ingest", str(tmp_path), "--uri", uri, "--artifact-root", str(tmp_path / "art")]
    assert subprocess.run(ingest, check=True, capture_output=True, text=True).stdout.strip() == "2"
    assert subprocess.run(ingest, check=True, capture_output=True, text=True).stdout.strip() == "0"  # idempotent
    client, runs = _runs(uri)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert sorted(by_stage) == ["pretrain", "prune"]
    masks = json.loads((tmp_path / "u.json").read_text())
    assert by_stage["prune"].data.metrics["macs"] == masks["macs"]
    assert by_stage["prune"].data.tags["variant"] == "u40"
    history = client.get_metric_history(by_stage["pretrain"].info.run_id, "top1")
    assert [m.step for m in history] == [1]
    assert [a.path for a in client.list_artifacts(by_stage["prune"].info.run_id)] == ["u.json"]
    # the pruned network's parent run, and the link to the pretraining it started from
    parent = client.get_run(by_stage["prune"].data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "u40 seed0" and "mlflow.parentRunId" not in by_stage["pretrain"].data.tags
    assert by_stage["prune"].data.tags["pretrain_run_id"] == by_stage["pretrain"].info.run_id

    # the results moved elsewhere (records, outputs), the store deleted: the records alone rebuild it,
    # with the artifacts read from where they are now
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("store", "art"))
    for f in tmp_path.glob("u.*"):
        f.unlink()
    uri = f"sqlite:///{moved}/store/mlflow.db"
    ingest = [*PAS, "tracking-ingest", str(moved), "--uri", uri, "--artifact-root", str(moved / "art")]
    assert subprocess.run(ingest, check=True, capture_output=True, text=True).stdout.strip() == "2"
    client, again = _runs(uri)
    assert sorted(r.data.tags["stage"] for r in again) == ["pretrain", "prune"]
    prune_run = next(r for r in again if r.data.tags["stage"] == "prune")
    (moved / "downloads").mkdir()
    downloaded = client.download_artifacts(prune_run.info.run_id, "u.json", str(moved / "downloads"))
    assert json.loads(Path(downloaded).read_text()) == masks


def test_ingest_skips_runs_the_jobs_logged_directly(tmp_path):
    """In direct mode the job logged its run already: ingesting its record adds nothing; after the
    store is deleted, the same record rebuilds the run with the same id, tags and metrics."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "pre.json"
    subprocess.run([*PAS, "tracking-init", "--uri", uri, "--experiment", "pas", "--artifact-root",
                    str(tmp_path / "art")], check=True, capture_output=True)
    subprocess.run([*PAS, "pretrain", "--set", "backbone=repvgg_a0_mini", "--set", "dataset.max_train=200",
                    "--set", "dataset.max_val=100", "--set", "epochs=1", "--set", f"tracking.uri={uri}", "--set",
                    f"tracking.artifact_root={tmp_path / 'art'}", "--out-weights", str(tmp_path / "pre.pt"),
                    "--out-metrics", str(out)], check=True, capture_output=True)
    record = json.loads((tmp_path / "pre.run.json").read_text())
    _, (direct,) = _runs(uri)
    assert direct.data.tags["pas_record"] == record["tags"]["pas_record"] and len(record["tags"]["pas_record"]) == 32
    ingest = [*PAS, "tracking-ingest", str(tmp_path), "--uri", uri, "--artifact-root", str(tmp_path / "art")]
    assert subprocess.run(ingest, check=True, capture_output=True, text=True).stdout.strip() == "0"
    (tmp_path / "mlflow.db").unlink()
    assert subprocess.run(ingest, check=True, capture_output=True, text=True).stdout.strip() == "1"
    _, (rebuilt,) = _runs(uri)
    assert {k: v for k, v in rebuilt.data.tags.items() if not k.startswith("mlflow.")} == \
        {k: v for k, v in direct.data.tags.items() if not k.startswith("mlflow.")}
    assert rebuilt.data.metrics == direct.data.metrics
    assert rebuilt.data.metrics["final_top1"] == json.loads(out.read_text())["final_top1"]


def test_ingest_keeps_each_runs_real_times(tmp_path):
    """A cluster job's run, ingested later, starts and ends when the job did, and each metric keeps
    the time it was logged at: the record's times, not the ingest's."""
    import time
    common = ["--set", "backbone=repvgg_a0_mini", "--set", "dataset.max_train=200", "--set", "dataset.max_val=100",
              "--set", "tracking.enabled=false"]
    subprocess.run([*PAS, "pretrain", *common, "--set", "epochs=2", "--out-weights", str(tmp_path / "pre.pt"),
                    "--out-metrics", str(tmp_path / "pre.json")], check=True, capture_output=True)
    record = json.loads((tmp_path / "pre.run.json").read_text())
    time.sleep(1.5)
    ingested_after = int(time.time() * 1000)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    subprocess.run([*PAS, "tracking-ingest", str(tmp_path), "--uri", uri, "--artifact-root", str(tmp_path / "art")],
                   check=True, capture_output=True)
    client, (run,) = _runs(uri)
    assert (run.info.start_time, run.info.end_time) == (record["start_time"], record["end_time"])
    assert record["start_time"] < record["end_time"] < ingested_after
    logged = {(row["step"], row["timestamp"]) for row in record["metrics"] if "top1" in row["values"]}
    stored = {(m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, "top1")}
    assert stored == logged and len(stored) == 2
    assert all(record["start_time"] <= t <= record["end_time"] for _, t in stored)
