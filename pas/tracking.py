"""MLflow logging for the stages; a no-op when tracking is off. Plain files are written regardless.

Runs are nested as the MLflow UI shows them best: one parent run per network and seed (`PaS-A
seed0`, `uniform@PaS-A seed0`, ...) with a child run per stage (search or prune, finetune, deploy,
evaluate); the parent carries the network's evaluation metrics. A backbone's pretraining is a run of
its own; every child that starts from it (directly or through the stages before it) names it in the
tag `pretrain_run_id`. A child finds the run that wrote its input by the input's path: each run tags
the weights it wrote (`pas_weights_out`). The deploy stage logs the compact network as an MLflow
model (ONNX flavour); a PaS variant's is registered under the variant's name, one version per seed
and run, and the evaluate stage's metrics are linked to that model.

The SQLite store is created once (`init_store`) before jobs run in parallel: several processes
creating a new SQLite schema at the same time race each other. Experiments get an absolute artifact
location so every process, wherever it runs from, stores artifacts in the same folder.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import uuid
from pathlib import Path

from pas.config import SCRATCH_METHODS, flatten
from pas.errors import PasError
from pas.machine import machine_tags


EXPERIMENT_KIND = "mlflow.experimentKind"


def _absolute_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def init_store(uri: str, experiment: str, artifact_root: str) -> str:
    """Create the store's schema and the experiment; return the experiment id. Idempotent."""
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=_absolute_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_root).resolve()
    location.mkdir(parents=True, exist_ok=True)
    try:
        # The kind makes the MLflow 3 UI open the experiment on its training runs, not its GenAI
        # (traces) view.
        return client.create_experiment(experiment, artifact_location=location.as_uri(),
                                        tags={EXPERIMENT_KIND: "custom_model_development"})
    except Exception:  # created by a concurrent process in the meantime
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """One MLflow run per stage invocation, mirrored in a plain run record (JSON).

    The record holds the run's tags, params, metrics and artifact paths, and is written whether
    or not MLflow is on: on a cluster (SQLite over a shared file system is unsafe) jobs run with
    tracking off and one local step replays the records into the store (`ingest`).
    """

    def __init__(self, cfg: dict, *, stage: str, run_name: str, enabled: bool = True,
                 record_path: str | Path | None = None, weights_in: str | Path | None = None,
                 weights_out: str | Path | None = None):
        self.writer = enabled
        self.enabled = enabled and cfg["tracking"]["enabled"]
        self.record_path = Path(record_path) if record_path else None
        commit = git_commit()
        tags = {"stage": stage, "backbone": cfg["backbone"], "seed": str(cfg["seed"]),
                "git_commit": commit, "host": socket.gethostname(),
                **{k: str(v) for k, v in cfg["tags"].items()},
                # the standard tags the MLflow UI shows (source, user, description)
                "mlflow.source.git.commit": commit, "mlflow.source.name": f"pas {stage}",
                "mlflow.source.type": "JOB", "mlflow.user": _user(),
                "mlflow.note.content": _note(stage, cfg)}
        tags.update(machine_tags())  # what makes two machines' results differ (pas.machine)
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        # the record's id tags its MLflow run, here and when ingested: a record is in a store once
        tags["pas_record"] = uuid.uuid4().hex
        # what links the runs: the weights this stage read and wrote (absolute paths)
        if weights_in:
            tags["pas_weights_in"] = str(Path(weights_in).resolve())
        if weights_out:
            tags["pas_weights_out"] = str(Path(weights_out).resolve())
        self.record = {"run_name": run_name, "tags": tags, "start_time": _now_ms(), "end_time": None,
                       "params": {k: str(v)[:6000] for k, v in flatten(cfg).items()},
                       "metrics": [], "artifacts": [], "models": [], "parent": parent_of(cfg, stage)}
        self.client = self.run = None
        self.finished = False
        if self.enabled:
            t = cfg["tracking"]
            self.run = _start_run(t["uri"], t["experiment"], t["artifact_root"], self.record)
            self.client = self.run.client

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    def metrics(self, values: dict, step: int | None = None) -> None:
        rows = {k: float(v) for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        timestamp = _now_ms()
        self.record["metrics"].append({"step": step or 0, "timestamp": timestamp, "values": rows})
        if self.enabled:
            _log_metrics(self.client, self.run_id, rows, step or 0, timestamp, self.run.model_id)

    def tags(self, values: dict) -> None:
        """Tags set during the run (e.g. what a checkpoint import did)."""
        values = {k: str(v) for k, v in values.items()}
        self.record["tags"].update(values)
        if self.enabled:
            for key, value in values.items():
                self.client.set_tag(self.run_id, key, value)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not Path(path).exists():
            return
        self.record["artifacts"].append({"path": self._relative(path), "folder": folder})
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), folder)

    def model(self, deployed_dir: str | Path, *, normalization: dict | None, registered_name: str | None = None) -> None:
        """Log a deployed network (pas deploy's folder) as an MLflow model, with the input
        normalisation it expects ({"mean": [...], "std": [...]}, per channel); registered under
        `registered_name` when given."""
        entry = {"dir": self._relative(deployed_dir), "registered_name": registered_name,
                 "normalization": normalization}
        self.record["models"].append(entry)
        if self.enabled:
            _log_deployed_model(self.run, {**entry, "dir": str(Path(deployed_dir).resolve())}, self.record)

    def _relative(self, path: str | Path) -> str:
        """A path as the record keeps it: relative to the record's folder where it lies below it,
        so that a moved results/ folder still ingests (absolute otherwise)."""
        path = Path(path).resolve()
        if self.record_path is not None:
            try:
                return str(path.relative_to(self.record_path.resolve().parent))
            except ValueError:
                pass
        return str(path)

    def finish(self, ok: bool = True) -> None:
        """Close the run; only a successful run leaves a record (a failed one is no result)."""
        if self.finished:
            return
        self.finished = True
        self.record["end_time"] = _now_ms()
        if ok and self.record_path and self.writer:
            from pas.io import atomic_write_json
            atomic_write_json(self.record_path, self.record)
        if self.enabled:
            _close_run(self.run, self.record, ok)


def _now_ms() -> int:
    import time
    return int(time.time() * 1000)


def _user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (some containers)
        return str(os.getuid())


def _note(stage: str, cfg: dict) -> str:
    """The run's one-paragraph description (the UI's Description field)."""
    t = cfg["tags"]
    what = {"pretrain": "trains (or imports) the full backbone", "search": "searches the layer widths with DBC gates "
            "and the MACs penalty", "prune": "computes a baseline's masks", "finetune": "fine-tunes the masked "
            "network", "deploy": "fuses, compacts and exports the network", "evaluate": "measures accuracy, MACs "
            "and latency of the deployed network"}.get(stage, stage)
    row = t.get("variant", cfg["backbone"])
    target = f" at target {t['target']}" if t.get("target") not in (None, "full") else ""
    return (f"{row} ({t.get('method', 'pas')} on {cfg['backbone']}{target}), seed {cfg['seed']}: this run {what} "
            f"on {cfg.get('dataset', {}).get('name', 'its data')}.")


class _Run:
    """An open MLflow run of a stage: its client, experiment, id, parent and the model its metrics
    belong to (the evaluate stage's: the deployed network's logged model)."""

    def __init__(self, client, experiment_id: str, run_id: str, parent_id: str | None, model_id: str | None):
        self.client, self.experiment_id, self.run_id = client, experiment_id, run_id
        self.parent_id, self.model_id = parent_id, model_id


def parent_of(cfg: dict, stage: str) -> dict | None:
    """The parent run of a stage's run: one per network (tag `variant`) and seed, none for a
    backbone's pretraining (a run of its own) or a stage run outside the workflow (no variant)."""
    t = cfg["tags"]
    if ("variant" not in t or t.get("method") == "pretrain"
            or stage == "pretrain" and t.get("method") not in SCRATCH_METHODS):
        return None
    method = t.get("method", "pas")
    name = f"{t['variant']} seed{cfg['seed']}" + (" (full)" if method == "full" else "")
    tags = {k: str(v) for k, v in t.items()}
    tags.update({"backbone": cfg["backbone"], "seed": str(cfg["seed"]),
                 "mlflow.note.content": _parent_note(cfg), "mlflow.user": _user()})
    return {"key": f"{method}:{t['variant']}:seed{cfg['seed']}", "name": name, "tags": tags}


def _parent_note(cfg: dict) -> str:
    t = cfg["tags"]
    what = {"pas": "searched by PaS", "full": "the full backbone, fine-tuned as every pruned network",
            "scratch": "a smaller family member trained from scratch with the backbone's schedule",
            "scratch_long": "a smaller family member trained from scratch for PaS's total epochs (pretrain + "
                            "search + fine-tune)"}.get(t.get("method"), f"pruned by {t.get('method')}")
    target = f" to {t['target']}" if t.get("target") not in (None, "", "full") else ""
    return (f"{t['variant']} on {cfg['backbone']}, seed {cfg['seed']}: {what}{target}. Its child runs are the "
            f"stages; the evaluation metrics are repeated here.")


def _quoted(value: str) -> str | None:
    """A value for an MLflow filter string, None where it cannot be quoted."""
    return None if "'" in value or "\\" in value else f"'{value}'"


def _producer(client, exp_id: str, weights_in: str, before: int):
    """The run that wrote these weights: the last one to finish before `before` (ms)."""
    value = _quoted(weights_in)
    if value is None:
        return None
    runs = client.search_runs([exp_id], filter_string=f"tags.pas_weights_out = {value}", max_results=100)
    done = [r for r in runs if r.info.end_time and r.info.end_time <= before and r.info.status == "FINISHED"]
    return max(done, key=lambda r: r.info.end_time, default=None)


def _links(client, exp_id: str, tags: dict, start: int) -> dict:
    """Tags naming the run whose weights this one starts from and the pretraining behind it."""
    producer = _producer(client, exp_id, tags["pas_weights_in"], start) if "pas_weights_in" in tags else None
    if producer is None:
        return {}
    links = {"input_run_id": producer.info.run_id}
    if producer.data.tags.get("stage") == "pretrain" and producer.data.tags.get("method", "pretrain") == "pretrain":
        links["pretrain_run_id"] = producer.info.run_id
    elif "pretrain_run_id" in producer.data.tags:
        links["pretrain_run_id"] = producer.data.tags["pretrain_run_id"]
    return links


def _deployed_model_id(client, exp_id: str, input_run_id: str | None) -> str | None:
    """The logged model of the deploy run this one evaluates."""
    if not input_run_id:
        return None
    found = client.search_logged_models(experiment_ids=[exp_id], filter_string=f"source_run_id = '{input_run_id}'",
                                        max_results=1)
    return found[0].model_id if found else None


def _parent_run(client, exp_id: str, parent: dict, start: int) -> str:
    """The network's parent run, created by its first stage. The stages of one network run one
    after the other; should two processes still create it at once, all settle on the older one."""
    query = f"tags.pas_parent = '{parent['key']}'"
    found = client.search_runs([exp_id], filter_string=query, max_results=10)
    if not found:
        client.create_run(exp_id, start_time=start, run_name=parent["name"],
                          tags={**parent["tags"], "pas_parent": parent["key"], "mlflow.runName": parent["name"]})
        found = client.search_runs([exp_id], filter_string=query, max_results=10)
    oldest = min(found, key=lambda r: (r.info.start_time, r.info.run_id))
    client.update_run(oldest.info.run_id, status="RUNNING")
    return oldest.info.run_id


def _start_run(uri: str, experiment: str, artifact_root: str, record: dict) -> _Run:
    """Open the stage's run (and its parent's) for a record; the record's start time is the run's."""
    import mlflow
    from mlflow.entities import Param
    try:  # a store path under a file, an unreadable database, ...: one line, not a traceback
        client = mlflow.MlflowClient(tracking_uri=_absolute_uri(uri))
        exp_id = init_store(uri, experiment, artifact_root)
    except Exception as e:
        raise PasError(f"MLflow store {uri!r} cannot be opened: {str(e).splitlines()[0]}") from None
    start, tags = record.get("start_time") or _now_ms(), dict(record["tags"])
    links = _links(client, exp_id, tags, start)
    tags.update(links)
    parent_id = _parent_run(client, exp_id, record["parent"], start) if record.get("parent") else None
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run_id = client.create_run(exp_id, start_time=start, tags={**tags, "mlflow.runName": record["run_name"]},
                               run_name=record["run_name"]).info.run_id
    items = [Param(k, v) for k, v in record["params"].items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    model_id = _deployed_model_id(client, exp_id, links.get("input_run_id")) if tags["stage"] == "evaluate" else None
    return _Run(client, exp_id, run_id, parent_id, model_id)


def _close_run(run: _Run, record: dict, ok: bool) -> None:
    """End the stage's run; its parent ends with it, and an evaluation's metrics become the parent's."""
    status, end = ("FINISHED" if ok else "FAILED"), record["end_time"]
    run.client.set_terminated(run.run_id, status, end_time=end)
    if not run.parent_id:
        return
    if ok and record["tags"]["stage"] == "evaluate":
        last = {}
        for row in record["metrics"]:
            last.update(row["values"])
        _log_metrics(run.client, run.parent_id, last, 0, end)
    run.client.set_terminated(run.parent_id, status, end_time=end)


def _log_metrics(client, run_id: str, values: dict, step: int, timestamp: int | None = None,
                 model_id: str | None = None) -> None:
    from mlflow.entities import Metric
    timestamp = _now_ms() if timestamp is None else timestamp
    batch = [Metric(k, v, timestamp, step, model_id=model_id) for k, v in values.items()]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i:i + 500])


def _log_deployed_model(run: _Run, entry: dict, record: dict) -> None:
    """The deployed folder as an MLflow model (ONNX flavour): signature and input example from
    arch.json, the input normalisation and the architecture in its metadata, arch.json and
    deploy.json beside it; registered when the entry names a registered model."""
    import json

    import mlflow
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in job logs
    folder = Path(entry["dir"])
    arch = json.loads((folder / "arch.json").read_text())
    example = np.random.default_rng(0).standard_normal(
        (1, arch["in_channels"], arch["resolution"], arch["resolution"])).astype(np.float32)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    signature = infer_signature({"input": example}, {"logits": session.run(None, {"input": example})[0]})
    tags = record["tags"]
    metadata = {"arch": arch, "normalization": entry["normalization"],
                "variant": tags.get("variant"), "method": tags.get("method"), "seed": tags.get("seed"),
                "target": tags.get("target"), "pas_record": tags["pas_record"]}
    mlflow.set_tracking_uri(run.client.tracking_uri)
    mlflow.set_experiment(experiment_id=run.experiment_id)  # the logged model's experiment is the run's
    info = mlflow.onnx.log_model(onnx.load(str(folder / "model.onnx")), name="model", run_id=run.run_id,
                                 signature=signature, input_example={"input": example},
                                 pip_requirements=["onnx", "onnxruntime"], metadata=metadata,
                                 extra_files=[str(folder / "arch.json"), str(folder / "deploy.json")],
                                 save_as_external_data=False,
                                 registered_model_name=entry["registered_name"], await_registration_for=0)
    if entry["registered_name"] and info.registered_model_version:
        client = run.client
        for key in ("seed", "target", "variant", "pas_record"):
            if tags.get(key) is not None:
                client.set_model_version_tag(entry["registered_name"], str(info.registered_model_version), key,
                                             str(tags[key]))


def ingest(records: list[str | Path], *, uri: str, experiment: str, artifact_root: str) -> int:
    """Replay run records into the MLflow store; a record already ingested is skipped.

    Deleting the store and ingesting again rebuilds it from the files alone. Returns the number
    of runs created.
    """
    import json

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=_absolute_uri(uri))
    exp_id = init_store(uri, experiment, artifact_root)
    created = 0
    loaded = []
    for path in sorted(Path(p).resolve() for p in records):
        try:
            loaded.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise PasError(f"run record {str(path)!r} cannot be read: {e}") from None
    # in the order the jobs ran: a run's inputs (and its parent) are in the store before it
    loaded.sort(key=lambda item: (item[1].get("start_time") or 0, str(item[0])))
    for path, rec in loaded:
        key = rec["tags"].get("pas_record") or f"{path}:{path.stat().st_mtime_ns}"
        if not re.fullmatch(r"[\w/.:-]+", key):
            raise PasError(f"run record {str(path)!r} has the id {key!r}; expected letters, digits and /.:_-")
        found = client.search_runs([exp_id], filter_string=f"tags.pas_record = '{key}'", max_results=1)
        if found:  # ingested before, or logged directly by the job that wrote the record
            continue
        # the run's real start and end and each metric's own time, as the job recorded them (a
        # record of an older version has none: the ingest time stands in)
        rec = {**rec, "tags": {**rec["tags"], "pas_record": key}, "parent": rec.get("parent"),
               "end_time": rec.get("end_time") or _now_ms()}
        run = _start_run(uri, experiment, artifact_root, rec)
        for row in rec["metrics"]:
            _log_metrics(client, run.run_id, row["values"], row["step"], row.get("timestamp"), run.model_id)
        for a in rec["artifacts"]:
            if (path_of := path.parent / a["path"]).exists():  # relative to the record, or absolute
                client.log_artifact(run.run_id, str(path_of), a["folder"])
        for entry in rec.get("models", []):
            if (folder := path.parent / entry["dir"]).is_dir():
                _log_deployed_model(run, {**entry, "dir": str(folder)}, rec)
        _close_run(run, rec, True)
        created += 1
    return created
