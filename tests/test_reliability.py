"""Reliability, with the real components: a one-variant cut of the tiny config's DAG (PaS-A, the
uniform baseline, the full backbone and a scratch reference: every kind of job) through
profiles/slurm on the one-node test cluster (with one training job scancelled and retried) gives the same table as a
local run of the same config (with search and fine-tune jobs killed -9 at seeded random moments and
the workflow started again until done); killed or cancelled training resumes after its last
complete epoch and ends bit-exact; jobs on a cluster write run records that one local command
ingests into MLflow. Plus the security checks: torch.load, the MLflow UI bind address, shell quoting
of config-derived strings in the rules, and the profiles' merge.

Both full runs go side by side (the SLURM run in the background while the local run is killed and
restarted): on 2 cores that keeps the module within minutes. PAS_RELIABILITY_SEED picks other kill
points.
"""
from __future__ import annotations

import ast
import base64
import csv
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from tests.slurm_cluster import kill_group, kill_processes_in

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
PAS = BIN / "pas"
TINY = ROOT / "config" / "test.yaml"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SEED = int(os.environ.get("PAS_RELIABILITY_SEED", "20261128"))
# Jobs run the cluster way (tracking.mode ingest: plain run records, replayed into MLflow by one
# local job at the end), from a second config file: `--config tracking='{mode: ingest}'` cannot say
# it (Snakemake reads nested --config values as strings).
TRACKING_INGEST = {"tracking": {"mode": "ingest"}}
LOCAL_TIMEOUT_S = 1200
SLURM_TIMEOUT_S = 1500  # whole run, 45 jobs at ~5-7 s SLURM overhead each, on 2 shared cores
POLL_S = 0.002  # a search writes its outputs within ~20 ms of its last epoch line

needs_snakemake = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed")


def reliability_config() -> dict:
    """config/test.yaml, deterministic (bit-exact on CPU), with enough epochs that a kill or a
    scancel can land between epochs (an epoch here is ~0.1-0.4 s; a job starts in ~6 s). One
    variant and one baseline: the properties tested here are per job, and every kind of job still
    runs (tests/test_workflow.py runs the tiny config's whole DAG)."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["variants"] = [v for v in cfg["variants"] if v["name"] == "PaS-A"]
    cfg["baselines"] = {"methods": ["uniform"]}
    cfg["training"] = {"deterministic": True}
    cfg["search"]["epochs"] = 5
    cfg["finetune"]["epochs"] = 4
    # pretrain and the scratch member (the backbones' schedule): 11 epochs, so that a scancel lands
    # between two; the stricter scratch row is the same rule with more epochs, left out here
    cfg["pretrain"]["epochs"] = 11
    cfg["references"]["scratch_long"] = False
    # The test cluster's node has a few GB; scheduling only, no effect on any result.
    cfg["resources"] = {"train": {"mem_mb": 1000}, "light": {"mem_mb": 1000}}
    return cfg


def env_with_pas(base: dict | None = None) -> dict:
    base = dict(os.environ if base is None else base)
    return {**base, "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}"}


def snakemake_args(workdir: Path) -> list[str]:
    return [str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), str(workdir / "tracking-ingest.yaml")]


def local_command(workdir: Path, *targets: str) -> list[str]:
    # The default profile (profiles/default, loaded by itself) adds rerun-incomplete, keep-going.
    return [*snakemake_args(workdir), "--cores", "2", *targets]


def slurm_command(workdir: Path) -> list[str]:
    """profiles/slurm as a user runs it, plus what this test cluster needs on the command line:
    its partition and no account (replacing the profile's placeholders), squeue for job states
    (no accounting database: sacct would hang the run), quick polling, and one retry."""
    return ["timeout", "-s", "INT", str(SLURM_TIMEOUT_S), *snakemake_args(workdir),
            "--profile", str(ROOT / "profiles" / "slurm"),
            "--default-resources", "slurm_partition=cpu",
            "--slurm-no-account", "--slurm-status-command", "squeue",
            "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
            "--latency-wait", "5", "--retries", "1"]


def prepare(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(reliability_config(), sort_keys=False))
    (workdir / "tracking-ingest.yaml").write_text(yaml.safe_dump(TRACKING_INGEST))
    return workdir


# -- what the tests compare --------------------------------------------------------------------

TIMES = {"wall_seconds", "epoch_seconds"}
# Columns of the results table that do not depend on timing.
TABLE_COLUMNS = ("model", "method", "backbone", "target_macs", "macs", "macs_ptflops", "params", "widths",
                 "top1", "top5")


def without_times(obj):
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def read_json(path: Path):
    return json.loads(path.read_text())


def read_table(workdir: Path) -> list[dict]:
    with open(workdir / "results" / "tables" / "main.csv", newline="") as f:
        return list(csv.DictReader(f))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def epochs_logged(text: str, label: str) -> list[int]:
    """Epoch numbers of the `[stage] epoch k/N ...` lines of a job's log, in order."""
    return [int(m.group(1)) for m in re.finditer(rf"^\[{label}\] epoch (\d+)/\d+ ", text, re.M)]


def resumed_after(text: str) -> int | None:
    m = re.search(r"^resuming after epoch (\d+)/(\d+) from ", text, re.M)
    return int(m.group(1)) if m else None


def epochs_done(text: str, label: str) -> int:
    """The last epoch an attempt has finished, from its log (a resumed one starts at its state's)."""
    return max([*epochs_logged(text, label), resumed_after(text) or 0])


def last_epoch_seconds(text: str) -> float:
    found = re.findall(r"epoch_seconds=([0-9.e+-]+)", text)
    return float(found[-1]) if found else 0.2


def incomplete_marks(workdir: Path) -> set[str]:
    """Outputs Snakemake has marked incomplete (.snakemake/incomplete: one file per output,
    named by the urlsafe base64 of its path, long names split into '@'-prefixed folders)."""
    root = workdir / ".snakemake" / "incomplete"
    marks = set()
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = Path(dirpath, name).relative_to(root)
            encoded = "".join(p.lstrip("@") for p in rel.parts)
            try:
                marks.add(base64.urlsafe_b64decode(encoded).decode())
            except ValueError:
                pass
    return marks


# -- the training jobs the tests interrupt ------------------------------------------------------

@dataclass(frozen=True)
class TrainingJob:
    rule: str
    stage: str  # `pas STAGE`, and the [stage] label of its epoch lines
    out_dir: str
    outputs: tuple[str, ...]
    log: str
    epochs: int

    @property
    def state(self) -> str:
        return f"{self.out_dir}/.weights.pt.state.pt"

    @property
    def out_weights(self) -> str:
        return f"{self.out_dir}/weights.pt"


CFG = reliability_config()
SEARCH = TrainingJob("search", "search", "results/seed0/models/pas/PaS-A/search",
                     ("weights.pt", "masks.json", "history.json", "metrics.json"),
                     "results/seed0/models/pas/PaS-A/logs/search.log", CFG["search"]["epochs"])
FINETUNE = TrainingJob("finetune", "finetune", "results/seed0/models/pas/PaS-A/finetune", ("weights.pt", "metrics.json"),
                       "results/seed0/models/pas/PaS-A/logs/finetune.log", CFG["finetune"]["epochs"])
SCRATCH = TrainingJob("train_scratch", "pretrain", "results/seed0/models/scratch/repvgg_a0_mini/train",
                      ("weights.pt", "metrics.json"), "results/seed0/models/scratch/repvgg_a0_mini/logs/train_scratch.log",
                      CFG["pretrain"]["epochs"])


def pas_process(workdir: Path, job: TrainingJob) -> int | None:
    """PID of the `pas STAGE` process of this job in this working directory (never another's)."""
    workdir = str(workdir.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (cwd == workdir and len(argv) > 3 and Path(argv[1]).name == "pas" and argv[2] == job.stage
                and "--out-weights" in argv and argv[argv.index("--out-weights") + 1] == job.out_weights):
            return int(entry.name)
    return None


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, ...; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def gone(pid: int) -> bool:
    return proc_stat(pid)[:1] in ([], ["Z"], ["X"])


def job_shell(pid: int) -> int | None:
    """The `bash -c '... pas ...'` that Snakemake runs the job's command in (pas's parent)."""
    stat = proc_stat(pid)
    if not stat:
        return None
    ppid = int(stat[1])
    try:
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return ppid if Path(argv[0]).name == "bash" and "pas " in " ".join(argv) else None


def set_stopped(pid: int, stopped: bool) -> None:
    os.kill(pid, signal.SIGSTOP if stopped else signal.SIGCONT)
    while stopped and proc_stat(pid)[:1] not in ([], ["T"]):
        time.sleep(0.001)


@dataclass
class Kill:
    """One kill -9 of a training job's pas process, and what was found right after it."""
    job: TrainingJob
    after_epoch: int  # the state file of this epoch exists, and the log shows it
    delay: float  # then wait this fraction of an epoch
    state_epoch: int | None = None  # the state file's epoch right after the kill (None: no file)
    log: str = ""  # the killed attempt's log
    marked: bool = False  # Snakemake had marked every declared output incomplete
    complete_outputs: list[str] = field(default_factory=list)  # outputs there and not marked incomplete
    hit: bool = False  # the job failed (else it had finished first)
    left_outputs: list[str] = field(default_factory=list)  # after Snakemake dealt with the failure
    left_state: bool = False
    left_table: bool = False


def kill_job(workdir: Path, kill: Kill, snakemake: subprocess.Popen, timeout: float) -> None:
    job, deadline = kill.job, time.monotonic() + timeout
    log, state = workdir / job.log, workdir / job.state

    def check_time(what):
        if snakemake.poll() is not None:
            pytest.fail(f"snakemake ended (rc {snakemake.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(POLL_S)

    while (pid := pas_process(workdir, job)) is None:
        check_time(f"the {job.rule} job to start")
    # A state file exists and the log shows epoch `after_epoch` done (a resumed attempt truncates
    # the log before `pas` starts, so an old attempt's lines do not count). After the last epoch
    # the job may already have removed its state file: it is then killed all the same.
    seen_state = False
    while True:
        seen_state = seen_state or state.exists()
        if seen_state and log.exists() and epochs_done(log.read_text(), job.stage) >= kill.after_epoch and (
                state.exists() or kill.after_epoch == job.epochs):
            break
        if gone(pid):
            return  # it finished first: no kill (kill.hit stays False)
        check_time(f"epoch {kill.after_epoch} of {job.rule}")
    time.sleep(kill.delay * last_epoch_seconds(log.read_text()))
    # The job's shell is held (SIGSTOP) across the kill, so that Snakemake cannot notice the failure
    # and clean up before the state right after the kill has been recorded; then it carries on.
    shell = job_shell(pid)
    if shell:
        set_stopped(shell, True)
    try:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while not gone(pid):
            time.sleep(0.001)
        # Right after the kill, before Snakemake reacts: what a re-run would find.
        kill.state_epoch = int(torch.load(state, weights_only=True)["epoch"]) if state.exists() else None
        kill.log = log.read_text()
        marks = incomplete_marks(workdir)
        kill.marked = all(f"{job.out_dir}/{o}" in marks for o in job.outputs)
        kill.complete_outputs = [f"{job.out_dir}/{o}" for o in job.outputs
                                 if (workdir / job.out_dir / o).exists() and f"{job.out_dir}/{o}" not in marks]
    finally:
        if shell:
            set_stopped(shell, False)


def run_logged(cmd: list[str], out: Path, env: dict, timeout: float) -> int:
    """`cmd` with its output in `out`, in a process group stopped however this call ends."""
    with open(out, "w") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out.parent,
                                   start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    finally:
        kill_group(process, grace_s=60)


# -- the runs ---------------------------------------------------------------------------------

@dataclass
class SlurmRun:
    workdir: Path
    process: subprocess.Popen
    monitor: threading.Thread
    cancel: dict  # what the scancel monitor did
    stop: threading.Event
    t0: float
    ended: list = field(default_factory=list)  # when the run ended (a waiter thread notes it)
    rc: int | None = None

    def wait(self) -> SlurmRun:
        if self.rc is None:
            try:
                self.rc = self.process.wait(timeout=SLURM_TIMEOUT_S + 60)
            finally:
                self.stop.set()
                self.monitor.join(timeout=10)
        return self

    @property
    def wall(self) -> float:
        return (self.ended[0] if self.ended else time.monotonic()) - self.t0

    @property
    def output(self) -> str:
        return (self.workdir / "snakemake.out").read_text()


def scancel_when_training(workdir: Path, env: dict, after_epoch: int, cancel: dict, stop: threading.Event) -> None:
    """scancel the train_scratch job once its log shows `after_epoch` done (its state file exists)."""
    log, state = workdir / SCRATCH.log, workdir / SCRATCH.state
    while not stop.is_set():
        if state.exists() and log.exists() and epochs_done(log.read_text(), SCRATCH.stage) >= after_epoch:
            queue = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True, env=env).stdout
            ids = [line.split()[0] for line in queue.splitlines() if f"rule_{SCRATCH.rule}_" in line]
            subprocess.run(["scancel", *ids], env=env, capture_output=True)
            cancel.update(job_ids=ids, log=log.read_text(), at=time.monotonic())
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def slurm_started(request, tmp_path_factory) -> SlurmRun | None:
    """The SLURM run, started in the background (None where no test cluster can be had)."""
    try:
        cluster = request.getfixturevalue("slurm_cluster")
    except pytest.skip.Exception:
        yield None
        return
    workdir = prepare(tmp_path_factory.mktemp("slurm_run"))
    env = env_with_pas(cluster.env)
    cancel, stop = {}, threading.Event()
    after_epoch = random.Random(SEED).randint(1, SCRATCH.epochs // 2)
    cancel["after_epoch"] = after_epoch
    monitor = threading.Thread(target=scancel_when_training, args=(workdir, env, after_epoch, cancel, stop),
                               daemon=True)
    monitor.start()
    out = open(workdir / "snakemake.out", "w")
    t0 = time.monotonic()
    process = subprocess.Popen(slurm_command(workdir), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                               start_new_session=True)
    out.close()
    run = SlurmRun(workdir, process, monitor, cancel, stop, t0)
    threading.Thread(target=lambda: (process.wait(), run.ended.append(time.monotonic())), daemon=True).start()
    yield run
    stop.set()
    # a failing test or an interrupted session left it running: SIGINT (which cancels its SLURM jobs)
    # to its whole process group, then SIGKILL; then whatever a cancelled job left in its folder
    kill_group(process, grace_s=60)
    left = kill_processes_in(workdir)
    if left:
        print(f"killed {len(left)} process(es) the SLURM run left in {workdir}: {left}")


@pytest.fixture(scope="module")
def slurm_run(slurm_started) -> SlurmRun:
    if slurm_started is None:
        pytest.skip("SLURM test cluster unavailable")
    run = slurm_started.wait()
    print(f"SLURM run: {run.wall:.0f} s")
    if run.rc != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-1500:]}" for p in run.workdir.glob("results/**/logs/*.log")
                         if "Error" in p.read_text() or "Traceback" in p.read_text())
        pytest.fail(f"SLURM run failed (rc {run.rc}):\n{run.output[-6000:]}\n{logs[-4000:]}")
    return run


@dataclass
class LocalRun:
    workdir: Path
    kills: list[Kill]
    attempts: list[tuple[int, str]]  # (rc, snakemake output) of each invocation
    wall: float


# Kill points, in order: two during the search's epochs, one after its last epoch (while it writes
# its outputs), two during the fine-tune's epochs. The epochs and delays are drawn from SEED; each
# point lies after the epoch the previous kill of the job left in its state file, so every attempt
# makes progress, and a `during` point leaves an epoch for the next one.
KILL_PLAN = ((SEARCH, "during"), (SEARCH, "during"), (SEARCH, "final"), (FINETUNE, "during"), (FINETUNE, "during"))


def draw_kill(rng: random.Random, job: TrainingJob, where: str, done: int, later_during: int) -> Kill:
    lo, hi = done + 1, job.epochs - 1 - later_during
    if where == "final" or lo > hi:
        return Kill(job, job.epochs, 0.0)
    return Kill(job, rng.randint(lo, hi), rng.uniform(0.0, 0.5))


@pytest.fixture(scope="module")
def local_run(slurm_started, tmp_path_factory) -> LocalRun:
    """The same config's whole DAG locally, killing the PaS-A search and fine-tune jobs at seeded
    random moments, re-running the same command after each kill until it completes."""
    workdir = prepare(tmp_path_factory.mktemp("local_run"))
    env, rng = env_with_pas(), random.Random(SEED)
    kills, attempts, t0 = [], [], time.monotonic()
    done: dict[str, int] = {}  # epoch in the state file after the last kill, per job
    finished: set[str] = set()  # jobs a kill missed: they completed
    for i, (job, where) in enumerate(KILL_PLAN):
        if job.rule in finished:
            continue
        later = sum(1 for j, w in KILL_PLAN[i + 1:] if j == job and w == "during")
        kill = draw_kill(rng, job, where, done.get(job.rule, 0), later)
        out = workdir / f"snakemake.{len(attempts)}.out"
        with open(out, "w") as f:
            snakemake = subprocess.Popen(local_command(workdir), stdout=f, stderr=subprocess.STDOUT, env=env,
                                         cwd=workdir, start_new_session=True)
        try:
            kill_job(workdir, kill, snakemake, timeout=LOCAL_TIMEOUT_S)
            rc = snakemake.wait(timeout=LOCAL_TIMEOUT_S)
        finally:
            kill_group(snakemake, grace_s=60)  # its jobs too, however this attempt ended
        text = out.read_text()
        kill.hit = f"Error in rule {job.rule}:" in text
        kills.append(kill)
        attempts.append((rc, text))
        done[job.rule] = kill.state_epoch or 0
        if not kill.hit:
            finished.add(job.rule)
        # what the killed run left behind, now that Snakemake has finished
        kill.left_outputs = [o for o in job.outputs if (workdir / job.out_dir / o).exists()]
        kill.left_state = (workdir / job.state).exists()
        kill.left_table = (workdir / "results" / "tables" / "main.csv").exists()
        print(f"kill -9 {job.rule} after epoch {kill.after_epoch} + {kill.delay:.2f} epoch: "
              f"state epoch {kill.state_epoch}, hit {kill.hit}, snakemake rc {rc}")
    final = workdir / f"snakemake.{len(attempts)}.out"
    rc = run_logged(local_command(workdir), final, env, LOCAL_TIMEOUT_S)
    attempts.append((rc, final.read_text()))
    wall = time.monotonic() - t0
    print(f"local run with {len(kills)} kills: {wall:.0f} s")
    assert rc == 0, final.read_text()[-6000:]
    return LocalRun(workdir, kills, attempts, wall)


@pytest.fixture(scope="module")
def reference(request, slurm_started, tmp_path_factory) -> Path:
    """A run in which the killed local jobs ran uninterrupted: the SLURM run; without a cluster,
    the chain up to the PaS-A fine-tune, locally."""
    if slurm_started is not None:
        return request.getfixturevalue("slurm_run").workdir
    workdir = prepare(tmp_path_factory.mktemp("reference"))
    out = workdir / "snakemake.out"
    rc = run_logged(local_command(workdir, f"{FINETUNE.out_dir}/metrics.json"), out, env_with_pas(), LOCAL_TIMEOUT_S)
    assert rc == 0, out.read_text()[-4000:]
    return workdir


# -- 1. the whole DAG through profiles/slurm equals a local run ---------------------------------

@pytest.mark.slow
@needs_snakemake
def test_slurm_run_gives_the_local_table(local_run, slurm_run):
    slurm_rows = read_table(slurm_run.workdir)
    local_rows = read_table(local_run.workdir)
    assert len(slurm_rows) == len(local_rows) == 4  # PaS-A, uniform@PaS-A, full, scratch
    key = lambda r: (r["method"], r["model"])  # noqa: E731
    slurm_rows, local_rows = sorted(slurm_rows, key=key), sorted(local_rows, key=key)
    for s, loc in zip(slurm_rows, local_rows):
        # deterministic training: accuracies equal too, not only MACs, params and widths
        assert {c: s[c] for c in TABLE_COLUMNS} == {c: loc[c] for c in TABLE_COLUMNS}
    # every training job's metrics (histories, losses, final accuracies), apart from wall times
    metrics = sorted(p.relative_to(local_run.workdir) for p in local_run.workdir.glob("results/seed0/**/metrics.json"))
    assert len(metrics) == 1 + 1 + 3 + 1  # pretrain, search, finetune (PaS-A, uniform, full), scratch
    for rel in metrics:
        here, there = read_json(local_run.workdir / rel), read_json(slurm_run.workdir / rel)
        assert without_times(here) == without_times(there), rel
    # every job but the local rules ran as a SLURM job, in this cluster's partition (the command
    # line's default-resources replace the profile's placeholders, account included)
    assert "slurm_partition=cpu" in slurm_run.output
    assert "slurm_partition=gpu" not in slurm_run.output and "my_account" not in slurm_run.output
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", slurm_run.output)
    local = set(re.findall(r"^localrule (\w+):", slurm_run.output, re.M))  # (+ the failed job's log)
    assert {"all", "plots", "tables", "evidence", "tracking_ingest"} <= local and "full_masks" not in local
    # every job but all, tables, plots, evidence and tracking_ingest; and the retry
    assert len(submitted) == 23 - 5 + 1


@pytest.mark.slow
@needs_snakemake
def test_slurm_cancelled_job_is_resubmitted_and_resumes(local_run, slurm_run):
    cancel = slurm_run.cancel
    assert cancel.get("job_ids"), f"the scancel monitor never fired: {cancel}"
    (job_id,) = cancel["job_ids"]
    out = slurm_run.output
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in out
    assert "Trying to restart job" in out
    # the retry resumed after the epochs the cancelled attempt had finished, and repeated none
    log = (slurm_run.workdir / SCRATCH.log).read_text()
    seen = max(epochs_logged(cancel["log"], SCRATCH.stage))
    k = resumed_after(log)
    assert k is not None and k >= seen >= cancel["after_epoch"] >= 1, log
    assert epochs_logged(log, SCRATCH.stage) == list(range(k + 1, SCRATCH.epochs + 1)), log
    # the cancelled attempt's SLURM log stays (the retry's is deleted once it succeeded)
    slurm_log = slurm_run.workdir / "results" / "slurm-logs" / "rule_train_scratch" / "0_scratch_repvgg_a0_mini" / f"{job_id}.log"
    assert f"JOB {job_id} ON" in slurm_log.read_text() and "CANCELLED" in slurm_log.read_text()
    # and the result is bit-exact the local run's, where it was not interrupted
    for name in ("weights.pt",):
        assert same_weights(slurm_run.workdir / SCRATCH.out_dir / name, local_run.workdir / SCRATCH.out_dir / name)
    assert (without_times(read_json(slurm_run.workdir / SCRATCH.out_dir / "metrics.json"))
            == without_times(read_json(local_run.workdir / SCRATCH.out_dir / "metrics.json")))
    assert not (slurm_run.workdir / SCRATCH.state).exists()


@pytest.mark.slow
@needs_snakemake
def test_cluster_jobs_write_run_records_that_one_local_rule_ingests(slurm_run):
    """Jobs on the cluster never touch the SQLite store (tracking.mode ingest); the local
    tracking_ingest job replays their run records into it at the end, once; deleting the store and
    running that rule again rebuilds it from results/."""
    import mlflow
    workdir = slurm_run.workdir
    db = workdir / "results" / "mlflow.db"
    records = sorted(workdir.glob("results/**/*run.json"))
    assert len(records) == 2 + 1 + 1 + 3 + 4 + 4  # pretrain+scratch, search, prune, finetune, deploy, evaluate
    assert (workdir / "results" / "mlflow" / "ingested.txt").read_text().strip() == str(len(records))
    assert "Error" not in (workdir / "results" / "mlflow" / "logs" / "tracking_ingest.log").read_text()
    assert not (workdir / "results" / "mlflow" / "experiment.txt").exists()  # no tracking_init job ran
    cmd = [str(PAS), "tracking-ingest", "results", "--uri", "sqlite:///results/mlflow.db", "--experiment", "pas",
           "--artifact-root", "results/mlflow-artifacts"]
    again = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.strip() == "0"  # a record is ingested once

    def stored_runs(parents=False):
        """The stages' runs, or the networks' parent runs."""
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
        found = client.search_runs([client.get_experiment_by_name("pas").experiment_id], max_results=1000)
        return [r for r in found if ("stage" in r.data.tags) != parents]

    runs = stored_runs()
    # one parent per table row (PaS-A, uniform@PaS-A, the full backbone, the scratch member)
    assert sorted(r.info.run_name for r in stored_runs(parents=True)) == sorted(
        ["PaS-A seed0", "uniform@PaS-A seed0", "repvgg_a0_mini seed0 (full)", "repvgg_a0_mini seed0"])
    stages: dict[str, int] = {}
    for run in runs:
        stages[run.data.tags["stage"]] = stages.get(run.data.tags["stage"], 0) + 1
        assert run.info.status == "FINISHED"
        assert run.data.tags["slurm_job_id"].isdigit()  # each ran as a SLURM job
        assert run.data.tags["seed"] == "0"
    assert stages == {"pretrain": 2, "search": 1, "prune": 1, "finetune": 3, "deploy": 4, "evaluate": 4}
    for run in runs:
        if run.data.tags["stage"] == "evaluate":
            tags = run.data.tags
            result = read_json(workdir / "results" / "seed0" / "models" / tags["method"] / tags["model"] / "eval.json")
            assert run.data.metrics["top1"] == result["top1"] and run.data.metrics["macs"] == result["macs"]
    # the cancelled attempt left no record: the scratch run is the retry's
    (scratch,) = [r for r in runs if r.data.tags["stage"] == "pretrain" and r.data.tags["method"] == "scratch"]
    assert scratch.data.tags["slurm_job_id"] not in slurm_run.cancel["job_ids"]

    # a lost store is rebuilt from the files alone, by the same rule, and holds the same runs
    db.unlink()
    out = workdir / "snakemake.rebuild.out"
    rc = run_logged(local_command(workdir, "--forcerun", "tracking_ingest"), out, env_with_pas(), 600)
    assert rc == 0, out.read_text()[-3000:]
    assert "tracking_ingest" in out.read_text() and "train_scratch" not in out.read_text()  # only that job
    assert (workdir / "results" / "mlflow" / "ingested.txt").read_text().strip() == str(len(records))
    rebuilt = stored_runs()
    assert sorted((r.data.tags["stage"], r.data.tags["variant"], r.data.tags["slurm_job_id"]) for r in rebuilt) == \
        sorted((r.data.tags["stage"], r.data.tags["variant"], r.data.tags["slurm_job_id"]) for r in runs)
    assert {r.info.run_name: r.data.metrics for r in rebuilt} == {r.info.run_name: r.data.metrics for r in runs}


# -- 3. kill -9 locally: resume after the last complete epoch, bit-exact -------------------------

@pytest.mark.slow
@needs_snakemake
def test_killed_jobs_leave_no_output_taken_as_complete(local_run):
    for kill in local_run.kills:
        if not kill.hit:
            continue
        # right after the kill: every declared output either absent or marked incomplete
        assert kill.marked and kill.complete_outputs == [], (kill.job.rule, kill.after_epoch)
        # once Snakemake has dealt with the failure: the outputs are gone, the table not written,
        # and the undeclared training state (if the job had one) kept for the next attempt
        assert kill.left_outputs == [], (kill.job.rule, kill.left_outputs)
        assert not kill.left_table
        assert kill.left_state == (kill.state_epoch is not None)
    for rc, _ in local_run.attempts[:-1]:
        assert rc != 0  # the run with the killed job failed; the last one completed
    # nor a temporary file of an atomic write the kill interrupted (the re-run job removes them)
    assert not list(local_run.workdir.glob("results/**/.*.tmp"))


def test_a_starting_stage_removes_what_a_killed_attempt_left(tmp_path):
    """kill -9 during an atomic write leaves `.NAME.XXXX.tmp` (or deploy's `.deploy.XXXX/`) that
    nothing renames: the next attempt of the job removes its own, and nothing else."""
    from pas.stages import _check_writable
    out = tmp_path / "search"
    out.mkdir()
    leftovers = [out / ".weights.pt.k2j3h4.tmp", out / "..weights.pt.state.pt.a1b2c3.tmp",
                 out / ".metrics.json.zz9.tmp", out / ".metrics.run.json.q1.tmp"]
    kept = [out / ".weights.pt.state.pt", out / "masks.json", out / ".masks.json.other.tmp"]
    for f in leftovers + kept:
        f.write_text("x")
    (tmp_path / ".deploy.abc123").mkdir()
    (tmp_path / ".deploy.abc123" / "arch.json").write_text("{}")
    _check_writable(str(out / "weights.pt"), str(out / "metrics.json"), str(tmp_path / "deploy"))
    assert [f for f in leftovers if f.exists()] == [] and not (tmp_path / ".deploy.abc123").exists()
    assert all(f.exists() for f in kept)


@pytest.mark.slow
@needs_snakemake
def test_killed_jobs_resume_after_their_last_complete_epoch(local_run):
    hits = [k for k in local_run.kills if k.hit]
    assert {k.job.rule for k in hits if k.state_epoch is not None and k.state_epoch < k.job.epochs} == {
        "search", "finetune"}, "no kill landed during the epochs of a job"
    for job in (SEARCH, FINETUNE):
        kills = [k for k in hits if k.job == job]
        # the log of each attempt after a kill: the one the next kill caught, or the final one
        logs = [k.log for k in kills[1:]] + [(local_run.workdir / job.log).read_text()]
        for kill, log in zip(kills, logs):
            if kill.state_epoch is None:  # killed before any state or after it was removed: from scratch
                assert resumed_after(log) is None
                continue
            assert kill.state_epoch >= kill.after_epoch >= 1
            # the state is the last epoch the killed attempt finished (its log line may not be out yet)
            assert kill.state_epoch - max(epochs_logged(kill.log, job.stage), default=0) in (0, 1)
            assert resumed_after(log) == kill.state_epoch, log
            # no epoch before it ran again
            logged = epochs_logged(log, job.stage)
            assert logged == list(range(kill.state_epoch + 1, kill.state_epoch + 1 + len(logged))), log
        final_log = logs[-1]
        assert epochs_logged(final_log, job.stage)[-1:] in ([job.epochs], [])  # the last attempt finished
    assert not any((local_run.workdir / j.state).exists() for j in (SEARCH, FINETUNE))


@pytest.mark.slow
@needs_snakemake
def test_killed_jobs_end_bit_exact_as_uninterrupted(local_run, reference):
    for job in (SEARCH, FINETUNE):
        here, there = local_run.workdir / job.out_dir, reference / job.out_dir
        assert same_weights(here / "weights.pt", there / "weights.pt"), job.rule
        a, b = read_json(here / "metrics.json"), read_json(there / "metrics.json")
        assert a["final_top1"] == b["final_top1"]
        assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
        assert without_times(a) == without_times(b), job.rule
    for name in ("masks.json", "history.json"):
        assert read_json(local_run.workdir / SEARCH.out_dir / name) == read_json(reference / SEARCH.out_dir / name)


# -- 4. security ------------------------------------------------------------------------------

def _calls(tree, dotted: str):
    module, name = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node


# The maintainers' one-off conversion of the published animal-mnist wheel (a pickle inside), checked
# against the wheel's sha256 digests first; never imported or run by pas (see its docstring).
NOT_RUN_BY_PAS = {ROOT / "pas" / "data" / "convert_animal_mnist.py"}


def test_every_torch_load_in_pas_is_weights_only():
    sources = sorted(set((ROOT / "pas").rglob("*.py")) - NOT_RUN_BY_PAS)
    found = 0
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch.load"):
            found += 1
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True"
        # no other way to unpickle: pickle's loaders, `from torch import load`, np.load of pickles
        for name in ("load", "loads", "Unpickler"):
            assert not list(_calls(tree, f"pickle.{name}")), f"{path.relative_to(ROOT)}: pickle.{name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle"):
                assert not {a.name for a in node.names} & {"load", "loads", "Unpickler"}, \
                    f"{path.relative_to(ROOT)}:{node.lineno}"
        for call in _calls(tree, "np.load"):
            kw = {k.arg: k.value for k in call.keywords}
            allow = kw.get("allow_pickle", ast.Constant(False))
            assert isinstance(allow, ast.Constant) and allow.value is False, f"{path.relative_to(ROOT)}:{call.lineno}"
    assert found >= 2  # engine (training state) and checkpoints (imports)


def test_readme_mlflow_ui_binds_loopback_only():
    commands = [line for line in (ROOT / "README.md").read_text().splitlines()
                if re.search(r"\bmlflow (ui|server)\b", line) and not line.lstrip().startswith(("#", "|"))]
    assert commands
    for line in commands:
        args = shlex.split(line)
        assert "--host" in args and args[args.index("--host") + 1] == "127.0.0.1", line
        assert "0.0.0.0" not in line


# Placeholders in the rules' shell commands and why each is safe: paths built from wildcards that
# the schema and check_config restrict to [A-Za-z0-9._-] names, numbers (threads, the first seed,
# the search epochs: integers by the schema; threads per training process: an integer computed from
# them), `:q`-quoted params, or params whose functions quote
# every value with shlex.quote (set_flags, pretrain_import, table_flags, history_flags,
# evidence_flags, latency_flags; checked with hostile values below).
SAFE_PLACEHOLDER = re.compile(r"^(input\.\w+|output\.\w+|log|threads|resources\.(nproc_per_node|threads_per_rank)|params\.\w+:q|"
                              r"params\.(stage|checkpoint|rows|histories|runs|seed|epochs|models|table|scenes))$")


def test_rule_shell_commands_quote_config_derived_strings():
    placeholders = set()
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for block in re.findall(r"^    shell:\n((?:        .*\n)+)", smk.read_text(), re.M):
            text = "".join(ast.literal_eval(line.strip()) for line in block.splitlines())
            placeholders |= {(smk.name, p) for p in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", text)}
    assert len(placeholders) > 10
    unsafe = sorted(p for p in placeholders if not SAFE_PLACEHOLDER.match(p[1]))
    assert unsafe == [], f"shell placeholders that may carry unquoted config strings: {unsafe}"


@pytest.mark.parametrize("name", ["PaS A", "PaS;touch INJECTED", "$(touch INJECTED)", "a'b", "-rf"])
def test_schema_forbids_shell_characters_in_variant_names(name):
    schema = yaml.safe_load(SCHEMA.read_text())
    pattern = schema["properties"]["variants"]["items"]["properties"]["name"]["pattern"]
    assert re.search(pattern, name) is None
    cfg = reliability_config()
    cfg["variants"][0]["name"] = name
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert any(list(e.absolute_path) == ["variants", 0, "name"] for e in validator.iter_errors(cfg))


HOSTILE = "/tmp/pas test/a b;touch INJECTED;$(touch INJECTED2)'\"`touch INJECTED3`"


def hostile_config() -> dict:
    cfg = reliability_config()
    cfg["variants"][0]["name"] = "PaS A"  # the one variant-name case run end to end: stopped
    return cfg


@needs_snakemake
def test_workflow_stops_on_a_variant_name_with_a_space(tmp_path):
    prepare(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(hostile_config()))
    result = subprocess.run([*snakemake_args(tmp_path), "-n"], capture_output=True, text=True, env=env_with_pas(),
                            timeout=120)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("config error:")]
    assert result.returncode != 0 and len(errors) == 1 and errors[0].startswith("config error: variants[0].name: ")


@needs_snakemake
def test_free_form_config_strings_reach_commands_as_single_arguments(tmp_path):
    """dataset.root, pretrain.weights and the tracking strings may hold any text: in every shell
    command of the workflow (as Snakemake prints it) each is one argument and reads back unchanged."""
    from pas.config import flatten, parse_override
    cfg = reliability_config()
    cfg["dataset"] = {"name": "folder", "root": HOSTILE, "resize": 28, "in_channels": 1}
    cfg["pretrain"]["weights"] = {"repvgg_a0_mini": HOSTILE + ".pt"}
    cfg["tracking"] = {"uri": "sqlite:///" + HOSTILE + ".db", "experiment": HOSTILE, "artifact_root": HOSTILE}
    expected = {"dataset.root": HOSTILE, "tracking.uri": "sqlite:///" + HOSTILE + ".db",
                "tracking.experiment": HOSTILE, "tracking.artifact_root": HOSTILE}
    by_flag = {"--import": HOSTILE + ".pt", "--uri": expected["tracking.uri"], "--experiment": HOSTILE,
               "--artifact-root": HOSTILE}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = [str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "config.yaml"), "-n", "-p", "--forceall"]
    result = subprocess.run(args, capture_output=True, text=True, env=env_with_pas(), timeout=120, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    commands = [line.removeprefix("Shell command: ") for line in result.stdout.splitlines()
                if line.startswith("Shell command: pas ")]
    assert len(commands) == 23  # every job but `all` (check_data included: the data is a folder)
    seen = set()
    for command in commands:
        argv = shlex.split(command)
        redirect = argv.index(">")  # the log redirection is the first unquoted `>`
        assert all(">" not in a or "INJECTED" in a for a in argv[:redirect]), command
        for before, arg in zip(argv, argv[1:redirect]):
            if "INJECTED" not in arg:
                continue
            if before == "--set":
                (key, value), = flatten(parse_override(arg)).items()
                assert value == expected[key], command
                seen.add(key)
            else:
                assert by_flag[before] == arg, command
                seen.add(before)
    assert seen == set(expected) | set(by_flag)


@pytest.mark.slow
@needs_snakemake
def test_hostile_tracking_strings_run_without_injection(tmp_path):
    """The tracking_init job, run for real with an experiment name and artifact folder full of
    shell syntax: the experiment and folder get exactly those names, and nothing else happens."""
    import mlflow
    cfg = reliability_config()
    name = "exp; touch INJECTED; $(touch INJECTED2) `touch INJECTED3` 'q\""
    cfg["tracking"] = {"experiment": name, "artifact_root": "results/art ;touch INJECTED4"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = [str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "config.yaml"), "--cores", "1", "results/mlflow/experiment.txt"]
    result = subprocess.run(args, capture_output=True, text=True, env=env_with_pas(), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert not [p for p in tmp_path.rglob("INJECTED*")] and not list(Path.cwd().glob("INJECTED*"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    assert exp is not None and exp.artifact_location == (tmp_path / "results" / "art ;touch INJECTED4").as_uri()
    assert (tmp_path / "results" / "art ;touch INJECTED4").is_dir()


# -- the profiles ----------------------------------------------------------------------------

def test_slurm_profile_keeps_its_settings_under_the_default_profile(tmp_path, capsys):
    """profiles/default is loaded by itself even with --profile profiles/slurm, and wins key by
    key: it must not set what the SLURM profile needs otherwise (`cores` caps every job's threads
    under the SLURM executor too; latency-wait)."""
    from snakemake.cli import parse_args
    _, args = parse_args(["--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                          "--profile", str(ROOT / "profiles" / "slurm")])
    assert args.executor == "slurm" and args.cores is None and args.latency_wait == 60 and args.retries == 2
    assert args.rerun_incomplete and args.keep_going
    _, local = parse_args(["--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "2"])
    assert local.executor is None and local.rerun_incomplete and local.keep_going  # the default profile
