"""Snakemake submits to a real SLURM cluster: jobs run under SLURM with the resources the rules ask
for, and a failing job is reported with a SLURM log that holds its error."""

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

from tests.slurm_cluster import SlurmCluster, run_in_own_group

SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# The whole run, startup included, must end within this; each SLURM job costs ~5-7 s.
RUN_TIMEOUT_S = 300

# Two jobs run side by side, a third joins them. Each writes SLURM's record of the job it runs in,
# so the test can check that it ran under SLURM with exactly the resources its rule requested.
SNAKEFILE = textwrap.dedent(
    """
    localrules: all

    RESOURCES = dict(runtime=5, mem_mb=300, cpus_per_task=1, slurm_partition="cpu")
    # SLURM's own record of the job this rule runs in, on one line.
    REPORT = "scontrol show job --oneliner $SLURM_JOB_ID"

    rule all:
        input: "c.txt"

    rule a:
        output: "a.txt"
        resources: **RESOURCES
        shell: REPORT + " > {output}"

    rule b:
        output: "b.txt"
        resources: **RESOURCES
        shell: "{FAIL_B}" + REPORT + " > {output}"

    rule c:
        input: "a.txt", "b.txt"
        output: "c.txt"
        resources: runtime=5, mem_mb=400, cpus_per_task=2, slurm_partition="cpu"
        shell: "cat {input} > {output} && " + REPORT + " >> {output}"
    """
)
FAIL_B = "echo 'rule b failed on purpose' >&2; exit 1; "


def run_snakemake(workdir: Path, cluster: SlurmCluster, *, fail_b: bool) -> subprocess.CompletedProcess[str]:
    snakefile = workdir / "Snakefile"
    snakefile.write_text(SNAKEFILE.replace("{FAIL_B}", FAIL_B if fail_b else ""))
    command = [
        # A run that hangs ignores SIGTERM; SIGINT stops it cleanly (and cancels its jobs).
        "timeout", "-s", "INT", str(RUN_TIMEOUT_S),
        str(SNAKEMAKE),
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        "--executor", "slurm",
        "--jobs", "3",
        # No accounting database: sacct fails, and the plugin would wait on finished jobs forever.
        "--slurm-status-command", "squeue",
        "--slurm-no-account",
        "--slurm-logdir", str(workdir / "slurm_logs"),
        "--slurm-init-seconds-before-status-checks", "1",
        "--seconds-between-status-checks", "2",
        "--latency-wait", "5",
    ]
    return run_in_own_group(command, env=cluster.env, timeout=RUN_TIMEOUT_S + 30)


def parse_report(line: str) -> dict[str, str]:
    """The fields of `scontrol show job --oneliner` that say where the job ran and with what."""
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    assert "JobId" in fields, f"not a scontrol job record: {line!r}"
    return {key: fields.get(key) for key in ("JobId", "Partition", "NodeList", "CPUs/Task", "MinMemoryNode", "TimeLimit")}


@pytest.mark.slow
def test_snakemake_runs_every_rule_as_a_slurm_job(slurm_cluster, tmp_path):
    result = run_snakemake(tmp_path, slurm_cluster, fail_b=False)
    assert result.returncode == 0, result.stderr[-5000:]

    a = parse_report((tmp_path / "a.txt").read_text().strip())
    b = parse_report((tmp_path / "b.txt").read_text().strip())
    c_lines = (tmp_path / "c.txt").read_text().strip().splitlines()
    assert len(c_lines) == 3
    assert [parse_report(line) for line in c_lines[:2]] == [a, b]  # c saw its inputs
    c = parse_report(c_lines[2])

    ids = [int(r["JobId"]) for r in (a, b, c)]
    assert len(set(ids)) == 3  # three separate SLURM jobs
    assert ids[2] > max(ids[:2])  # c was submitted after its inputs were done
    host = socket.gethostname().split(".")[0]
    for report in (a, b, c):
        assert (report["Partition"], report["NodeList"], report["TimeLimit"]) == ("cpu", host, "00:05:00")
    assert (a["CPUs/Task"], a["MinMemoryNode"]) == ("1", "300M")
    assert (b["CPUs/Task"], b["MinMemoryNode"]) == ("1", "300M")
    assert (c["CPUs/Task"], c["MinMemoryNode"]) == ("2", "400M")


@pytest.mark.slow
def test_failed_job_names_its_slurm_log(slurm_cluster, tmp_path):
    result = run_snakemake(tmp_path, slurm_cluster, fail_b=True)
    assert result.returncode not in (0, 124), result.stderr[-5000:]  # failed, and did not hang

    output = result.stdout + result.stderr
    # The plugin reports a failed job as "log: <path> (check log file(s) for error details)".
    logs = re.findall(r"log: (\S+) \(check log file", output)
    assert len(logs) == 1, output[-5000:]
    log = Path(logs[0])
    assert log.is_relative_to(tmp_path / "slurm_logs")
    assert log.parent.name == "rule_b"
    assert log.is_file()
    assert "rule b failed on purpose" in log.read_text()
    assert not (tmp_path / "b.txt").exists()
    assert not (tmp_path / "c.txt").exists()  # nothing ran after the failure


# -- profiles/slurm with the paper config, validated by slurmctld ----------------------------------

ROOT = Path(__file__).resolve().parent.parent
# Startup of the paper DAG (~20 s here) plus four SLURM jobs in about three waves.
PAPER_RUN_TIMEOUT_S = 240

# Stands in for `pas` inside the jobs: instead of training it records the SLURM job it runs in
# (scontrol's view), its own arguments and environment, and writes that record into every output
# the rule declares (--out-*, --out, and deploy's --out-dir files). The stages named in
# FAKE_PAS_FAIL_ONCE fail on their first run, to see what a retry asks for.
FAKE_PAS = textwrap.dedent(
    """\
    #!{python}
    import json, os, subprocess, sys
    from pathlib import Path

    argv = sys.argv[1:]
    stage = argv[0]
    record = {{
        "stage": stage,
        "argv": argv,
        "scontrol": subprocess.run(["scontrol", "show", "job", "--oneliner", os.environ["SLURM_JOB_ID"]],
                                   capture_output=True, text=True, check=True).stdout.strip(),
        "env": {{k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "CUDA_", "OMP_"))}},
    }}
    text = json.dumps(record)
    state = Path(os.environ["FAKE_PAS_STATE"])
    if stage in os.environ.get("FAKE_PAS_FAIL_ONCE", "").split(",") and not (state / f"{{stage}}.failed").exists():
        (state / f"{{stage}}.failed").write_text(text)
        sys.exit("failing on purpose, once")
    outputs = [argv[i + 1] for i, a in enumerate(argv) if a.startswith("--out") and a != "--out-dir"]
    if "--out-dir" in argv:
        out_dir = argv[argv.index("--out-dir") + 1]
        outputs += [f"{{out_dir}}/{{name}}" for name in ("arch.json", "model.safetensors", "model.onnx", "deploy.json")]
    for path in outputs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    """
)

# What the test cluster's one node can give: 2 CPUs, 2 GPUs (declared, not real), ~20 GB.
PAPER_OVERRIDES = {
    "evaluate": {"threads": 1},
    "resources": {
        "train": {"gpus": 2, "threads": 2, "mem_mb": 2000},
        "light": {"threads": 1, "mem_mb": 1000},
        "evaluate": {"gpus": 1},
    },
}
PRETRAIN = "results/seed0/pretrain/mobilenetv2_100/metrics.json"  # a GPU training job
PRUNE = "results/seed0/models/uniform/PaS-A/masks.json"  # a CPU job; its pretrained backbone is there
EVAL_DIR = "results/seed0/models/scratch/mobilenetv2_050"  # evaluate: one GPU, fails once


def scontrol_fields(line: str) -> dict[str, str]:
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    assert "JobId" in fields, f"not a scontrol job record: {line!r}"
    return fields


def set_value(argv: list[str], key: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    assert len(values) == 1, argv
    return values[0]


def prepare_paper_run(workdir: Path) -> tuple[Path, dict]:
    import json

    import yaml

    # The onstart check wants the ImageNet folder and the imported checkpoints to exist.
    (workdir / "imagenet").mkdir()
    weights = {name: workdir / f"{name}.pth" for name in ("repvgg_b1", "resnet50")}
    for path in weights.values():
        path.write_bytes(b"")
    overrides = dict(PAPER_OVERRIDES, dataset={"root": str(workdir / "imagenet")},
                     pretrain={"weights": {k: str(v) for k, v in weights.items()}})
    override_file = workdir / "cluster.yaml"
    override_file.write_text(yaml.safe_dump(overrides))
    # Already there, each older than its consumers: the data check, RepVGG-B1's pretraining (the
    # prune job's input) and everything upstream of one scratch network's evaluate. So the three
    # jobs under test start at once (one wave of SLURM jobs, plus evaluate's retry), each SLURM
    # job costing ~20 s here.
    upstream = ["results/data/check.json", "results/seed0/pretrain/repvgg_b1/weights.pt",
                "results/seed0/pretrain/repvgg_b1/metrics.json",
                f"{EVAL_DIR}/train/weights.pt", f"{EVAL_DIR}/train/metrics.json", f"{EVAL_DIR}/masks.json",
                *(f"{EVAL_DIR}/deploy/{n}" for n in ("arch.json", "model.safetensors", "model.onnx", "deploy.json"))]
    for age, rel in enumerate(reversed(upstream)):
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (time.time() - 100 - age, time.time() - 100 - age))

    bin_dir = workdir / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "pas").write_text(FAKE_PAS.format(python=sys.executable))
    (bin_dir / "pas").chmod(0o755)
    state = workdir / "fake-state"
    state.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}", "FAKE_PAS_STATE": str(state), "FAKE_PAS_FAIL_ONCE": "evaluate"}
    return override_file, env


@pytest.mark.slow
def test_paper_profile_requests_are_accepted_by_slurmctld(slurm_cluster, tmp_path):
    import json

    override_file, extra_env = prepare_paper_run(tmp_path)
    env = dict(slurm_cluster.env, FAKE_PAS_STATE=extra_env["FAKE_PAS_STATE"],
               FAKE_PAS_FAIL_ONCE=extra_env["FAKE_PAS_FAIL_ONCE"],
               PATH=extra_env["PATH"] + slurm_cluster.env["PATH"],
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [
        "timeout", "-s", "INT", str(PAPER_RUN_TIMEOUT_S),
        str(SNAKEMAKE),
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(tmp_path),
        # The profile and the paper config exactly as a user runs them ...
        "--profile", str(ROOT / "profiles" / "slurm"),
        "--configfile", str(ROOT / "config" / "paper.yaml"), str(override_file),
        # ... plus what this cluster needs: no accounting database, no accounts; and quick polls.
        "--slurm-status-command", "squeue", "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
        "--latency-wait", "5",
        PRETRAIN, PRUNE, f"{EVAL_DIR}/eval.json",
    ]
    started = time.monotonic()
    result = run_in_own_group(command, env=env, cwd=tmp_path, timeout=PAPER_RUN_TIMEOUT_S + 30)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    print(f"paper profile run: {elapsed:.0f} s")

    host = socket.gethostname().split(".")[0]
    paper = yaml_load(ROOT / "config" / "paper.yaml")["resources"]

    # The training job: the gpu partition, one node, both GPUs, the configured CPUs and memory,
    # pretrain's runtime, and each of the 2 processes told to use CPUs / 2 threads.
    pretrain = json.loads((tmp_path / PRETRAIN).read_text())
    job = scontrol_fields(pretrain["scontrol"])
    assert (job["Partition"], job["NumNodes"], job["NodeList"]) == ("gpu", "1", host)
    assert "gpu:2" in job.get("TresPerJob", "") + job.get("TresPerNode", ""), pretrain["scontrol"]
    assert (job["NumCPUs"], job["MinMemoryNode"]) == ("2", "2000M")
    assert job["TimeLimit"] == minutes_to_slurm(paper["train"]["runtime"]["pretrain"])
    ranks = int(pretrain["argv"][pretrain["argv"].index("--nproc-per-node") + 1])
    assert ranks == 2
    assert int(set_value(pretrain["argv"], "threads")) == int(job["NumCPUs"]) // ranks == 1
    assert pretrain["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # the job step sees both GPUs

    # The CPU job: the default (cpu) partition, no GPU, the light resources.
    prune = json.loads((tmp_path / PRUNE).read_text())
    job = scontrol_fields(prune["scontrol"])
    assert (job["Partition"], job["NumNodes"], job["NumCPUs"], job["MinMemoryNode"]) == ("cpu", "1", "1", "1000M")
    assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", "")
    assert job["TimeLimit"] == minutes_to_slurm(paper["light"]["runtime"])
    assert set_value(prune["argv"], "threads") == "1"
    assert "CUDA_VISIBLE_DEVICES" not in prune["env"]

    # evaluate with resources.evaluate.gpus 1: one GPU in the gpu partition; its retry asked for
    # twice the runtime of its first attempt.
    first = scontrol_fields(json.loads((tmp_path / "fake-state" / "evaluate.failed").read_text())["scontrol"])
    evaluate = json.loads((tmp_path / EVAL_DIR / "eval.json").read_text())
    job = scontrol_fields(evaluate["scontrol"])
    assert int(job["JobId"]) > int(first["JobId"])
    assert (job["Partition"], job["NumNodes"], job["NumCPUs"]) == ("gpu", "1", "1")
    assert "gpu:1" in job.get("TresPerJob", "") + job.get("TresPerNode", ""), evaluate["scontrol"]
    assert first["TimeLimit"] == minutes_to_slurm(paper["light"]["runtime"])
    assert job["TimeLimit"] == minutes_to_slurm(2 * paper["light"]["runtime"])
    assert evaluate["env"]["CUDA_VISIBLE_DEVICES"] == "0"


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def minutes_to_slurm(minutes: int) -> str:
    """SLURM's TimeLimit format: [D-]HH:MM:SS."""
    days, rest = divmod(minutes, 24 * 60)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


# -- cleanup when pytest is killed ---------------------------------------------------------------

# A session that holds the cluster and a process group started by run_in_own_group, and says
# where both are; the test below kills it with SIGTERM, as a CI timeout does.
HOLDING_SESSION = textwrap.dedent(
    """
    import os, time
    from pathlib import Path

    from tests.slurm_cluster import run_in_own_group, slurm_cluster  # noqa: F401

    def test_hold(slurm_cluster):
        report = Path(os.environ["HOLD_REPORT"])
        child = report.with_suffix(".child")
        (report.parent / "cluster_dir").write_text(str(slurm_cluster.dir))
        run_in_own_group(["sh", "-c", f"echo $$ > {child}; exec sleep 300"], timeout=300)
    """
)


def alive(pid: int, name: str) -> bool:
    """Like cluster.sh's `running`: PID runs NAME and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.startswith(f"{pid} ({name}) ") and not stat.startswith(f"{pid} ({name}) Z")


@pytest.mark.slow
def test_sigterm_to_pytest_stops_the_cluster(slurm_cluster, tmp_path):
    (tmp_path / "test_hold.py").write_text(HOLDING_SESSION)
    report = tmp_path / "report"
    env = dict(os.environ, HOLD_REPORT=str(report),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hold.py"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        child_file = report.with_suffix(".child")
        deadline = time.monotonic() + 120
        while not (child_file.exists() and child_file.read_text().strip()) and time.monotonic() < deadline:
            assert session.poll() is None, session.communicate()[0]
            time.sleep(0.2)
        cluster_dir = Path((tmp_path / "cluster_dir").read_text())
        daemons = [(name, int(pid)) for name, pid in
                   (line.split() for line in (cluster_dir / "pids").read_text().splitlines() if line.strip())]
        child = int(child_file.read_text())
        assert {name for name, _ in daemons} == {"munged", "slurmctld", "slurmd"}
        assert all(alive(pid, name) for name, pid in daemons) and alive(child, "sleep")

        session.send_signal(signal.SIGTERM)  # to pytest only, as `kill PID` would
        output, _ = session.communicate(timeout=120)
    finally:
        if session.poll() is None:
            os.killpg(session.pid, signal.SIGKILL)
            session.communicate()
    left = [f"{name} {pid}" for name, pid in [*daemons, ("sleep", child)] if alive(pid, name)]
    assert not left, f"still running after SIGTERM: {left}\n{output}"
    assert not cluster_dir.exists(), output  # stopped cleanly, folder removed
