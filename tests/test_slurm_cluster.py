"""Snakemake submits to a real SLURM cluster: jobs run under SLURM with the resources the rules ask
for, and a failing job is reported with a SLURM log that holds its error."""

import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster

SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# The whole run, startup included, must end within this; each SLURM job costs ~5-7 s.
RUN_TIMEOUT_S = 300

# Two jobs run side by side, a third joins them. Each writes SLURM's record of the job it runs in,
# so the test can check that it ran under SLURM with exactly the resources its rule requested.
SNAKEFILE = textwrap.dedent(
    """
    localrules: all

    RESOURCES = dict(runtime=5, mem_mb=300, cpus_per_task=1, slurm_partition="debug")
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
        resources: runtime=5, mem_mb=400, cpus_per_task=2, slurm_partition="debug"
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
    return subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30)


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
        assert (report["Partition"], report["NodeList"], report["TimeLimit"]) == ("debug", host, "00:05:00")
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
