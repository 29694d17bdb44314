"""MLflow logging for the stages; a no-op when tracking is off. Plain files are written regardless.

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

from pas.config import flatten
from pas.errors import PasError


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
                 record_path: str | Path | None = None):
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
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        # the record's id tags its MLflow run, here and when ingested: a record is in a store once
        tags["pas_record"] = uuid.uuid4().hex
        self.record = {"run_name": run_name, "tags": tags, "start_time": _now_ms(), "end_time": None,
                       "params": {k: str(v)[:6000] for k, v in flatten(cfg).items()},
                       "metrics": [], "artifacts": []}
        self.client = self.run_id = None
        self.finished = False
        if self.enabled:
            t = cfg["tracking"]
            self.client, self.run_id = _start_run(t["uri"], t["experiment"], t["artifact_root"],
                                                  run_name, tags, self.record["params"])

    def metrics(self, values: dict, step: int | None = None) -> None:
        rows = {k: float(v) for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        timestamp = _now_ms()
        self.record["metrics"].append({"step": step or 0, "timestamp": timestamp, "values": rows})
        if self.enabled:
            _log_metrics(self.client, self.run_id, rows, step or 0, timestamp)

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
        self.record["artifacts"].append({"path": str(Path(path).resolve()), "folder": folder})
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), folder)

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
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED", end_time=self.record["end_time"])


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


def _start_run(uri: str, experiment: str, artifact_root: str, run_name: str, tags: dict, params: dict,
               start_time: int | None = None):
    import mlflow
    from mlflow.entities import Param
    try:  # a store path under a file, an unreadable database, ...: one line, not a traceback
        client = mlflow.MlflowClient(tracking_uri=_absolute_uri(uri))
        exp_id = init_store(uri, experiment, artifact_root)
    except Exception as e:
        raise PasError(f"MLflow store {uri!r} cannot be opened: {str(e).splitlines()[0]}") from None
    run_id = client.create_run(exp_id, start_time=start_time, tags={**tags, "mlflow.runName": run_name},
                               run_name=run_name).info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    return client, run_id


def _log_metrics(client, run_id: str, values: dict, step: int, timestamp: int | None = None) -> None:
    from mlflow.entities import Metric
    timestamp = _now_ms() if timestamp is None else timestamp
    batch = [Metric(k, v, timestamp, step) for k, v in values.items()]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i:i + 500])


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
    for path in sorted(Path(p).resolve() for p in records):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PasError(f"run record {str(path)!r} cannot be read: {e}") from None
        key = rec["tags"].get("pas_record") or f"{path}:{path.stat().st_mtime_ns}"
        if not re.fullmatch(r"[\w/.:-]+", key):
            raise PasError(f"run record {str(path)!r} has the id {key!r}; expected letters, digits and /.:_-")
        found = client.search_runs([exp_id], filter_string=f"tags.pas_record = '{key}'", max_results=1)
        if found:  # ingested before, or logged directly by the job that wrote the record
            continue
        # the run's real start and end and each metric's own time, as the job recorded them (a
        # record of an older version has none: the ingest time stands in)
        _, run_id = _start_run(uri, experiment, artifact_root, rec["run_name"],
                               {**rec["tags"], "pas_record": key}, rec["params"], start_time=rec.get("start_time"))
        for row in rec["metrics"]:
            _log_metrics(client, run_id, row["values"], row["step"], row.get("timestamp"))
        for a in rec["artifacts"]:
            if Path(a["path"]).exists():
                client.log_artifact(run_id, a["path"], a["folder"])
        client.set_terminated(run_id, "FINISHED", end_time=rec.get("end_time"))
        created += 1
    return created
