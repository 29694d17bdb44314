"""MLflow logging for the stages; a no-op when tracking is off. Plain files are written regardless.

The SQLite store is created once (`init_store`) before jobs run in parallel: several processes
creating a new SQLite schema at the same time race each other. Experiments get an absolute artifact
location so every process, wherever it runs from, stores artifacts in the same folder.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from pas.config import flatten
from pas.errors import PasError


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
        return client.create_experiment(experiment, artifact_location=location.as_uri())
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
    """One MLflow run per stage invocation."""

    def __init__(self, cfg: dict, *, stage: str, run_name: str, enabled: bool = True):
        self.enabled = enabled and cfg["tracking"]["enabled"]
        self.client = self.run_id = None
        if not self.enabled:
            return
        import mlflow
        t = cfg["tracking"]
        uri = _absolute_uri(t["uri"])
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        try:
            exp_id = init_store(uri, t["experiment"], t["artifact_root"])
        except Exception as e:
            raise PasError(f"MLflow store {t['uri']!r} cannot be opened: {str(e).splitlines()[0]}") from None
        tags = {"stage": stage, "backbone": cfg["backbone"], "seed": str(cfg["seed"]),
                "git_commit": git_commit(), "host": socket.gethostname(),
                "mlflow.runName": run_name, **{k: str(v) for k, v in cfg["tags"].items()}}
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        run = self.client.create_run(exp_id, tags=tags, run_name=run_name)
        self.run_id = run.info.run_id
        from mlflow.entities import Param
        params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def metrics(self, values: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, ok: bool = True) -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
