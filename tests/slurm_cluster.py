"""A throw-away one-node SLURM cluster for tests, run by tests/slurm/cluster.sh.

The session-scoped fixture `slurm_cluster` installs SLURM and munge if they are missing (needs
root or password-less sudo, and apt-get), starts the daemons in a fresh temporary folder, yields a
`SlurmCluster` and stops the daemons at the end of the session.

Where the cluster cannot be had (no apt-get, no root) the tests that use it are skipped, except
on CI (CI=true), where they fail: CI must never pass by silently skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SCRIPT = Path(__file__).resolve().parent / "slurm" / "cluster.sh"
# The programs the cluster and the Snakemake SLURM plugin need; the daemons are in /usr/sbin.
REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "munged", "mungekey", "sinfo", "sbatch", "squeue", "scancel")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: pass `env` (SLURM_CONF, and PATH with the srun wrapper first) to every
    subprocess that talks to it."""

    dir: Path
    conf: Path
    env: dict[str, str]


def _missing_programs() -> list[str]:
    return [name for name in REQUIRED_PROGRAMS if shutil.which(name, path=SEARCH_PATH) is None]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"SLURM test cluster unavailable on CI: {reason}", pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def _can_be_root() -> bool:
    if os.geteuid() == 0:
        return True
    sudo = shutil.which("sudo")
    return sudo is not None and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if not _can_be_root():
        _unavailable("the daemons need root or password-less sudo")
    if _missing_programs():
        if shutil.which("apt-get") is None:
            _unavailable(f"{', '.join(_missing_programs())} missing and no apt-get to install them")
        # apt-get update plus install took ~13 s here; allow for slow mirrors.
        installed = _run_script("install", timeout=900)
        if installed.returncode != 0 or _missing_programs():
            _unavailable(f"cluster.sh install failed:\n{installed.stdout}\n{installed.stderr}")

    # Not pytest's tmp_path: munged insists that every folder above its socket is searchable by
    # all users, and pytest's base temp folder is private (0700).
    cluster_dir = Path(tempfile.mkdtemp(prefix="pas-slurm-", dir="/tmp"))
    started = _run_script("start", str(cluster_dir), timeout=120)
    if started.returncode != 0:
        _run_script("stop", str(cluster_dir), timeout=120)
        pytest.fail(
            f"cluster.sh start failed (rc {started.returncode}):\n{started.stdout}\n{started.stderr}",
            pytrace=False,
        )
    # The script prints `export SLURM_CONF=DIR/slurm.conf` and `export PATH=DIR/bin:$PATH`; DIR/bin
    # holds an srun wrapper that jobs need (see write_srun_wrapper in cluster.sh).
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
    )
    conf = Path(exports["SLURM_CONF"])
    path = exports["PATH"].replace("$PATH", os.environ.get("PATH", ""))
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=path)
    try:
        yield SlurmCluster(dir=cluster_dir, conf=conf, env=env)
    finally:
        stopped = _run_script("stop", str(cluster_dir), timeout=120)
        if stopped.returncode == 0:
            # Under sudo the SLURM daemons leave root-owned state and logs behind.
            sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
            subprocess.run([*sudo, "rm", "-rf", str(cluster_dir)], capture_output=True)
        else:
            # Keep the folder: its logs and pids are what is needed to clean up by hand.
            print(f"cluster.sh stop failed, left {cluster_dir}:\n{stopped.stderr}")
