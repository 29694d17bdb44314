"""A throw-away one-node SLURM cluster for tests, run by tests/slurm/cluster.sh.

The session-scoped fixture `slurm_cluster` installs SLURM and munge if they are missing (needs
root or password-less sudo, and apt-get), starts the daemons in a fresh temporary folder, yields a
`SlurmCluster` and stops the daemons at the end of the session, also when the run is interrupted:
SIGTERM (what a CI timeout sends) is turned into KeyboardInterrupt while the cluster runs, so
pytest tears the fixture down as it does on ^C, and an atexit hook stops the daemons if that did
not happen (e.g. SIGTERM while the cluster was starting). `run_in_own_group` runs a subprocess
(snakemake) in its own process group and kills the whole group however the test ends.

Where the cluster cannot be had (no apt-get, no root) the tests that use it are skipped, except
on CI (CI=true), where they fail: CI must never pass by silently skipping them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
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


def _sigterm_to_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(cluster_dir: Path) -> subprocess.CompletedProcess[str]:
    stopped = _run_script("stop", str(cluster_dir), timeout=120)
    if stopped.returncode == 0:
        # Under sudo the SLURM daemons leave root-owned state and logs behind.
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        subprocess.run([*sudo, "rm", "-rf", str(cluster_dir)], capture_output=True)
    return stopped


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
    # From here on the daemons must not outlive pytest: SIGTERM unwinds like ^C (the finally below
    # runs), and the atexit hook covers what no finally reached. Stopping twice is harmless (the
    # second finds no DIR/pids), but the hook skips it once the finally has stopped the cluster.
    stopped = False

    def stop_at_exit() -> None:
        if not stopped:
            _stop(cluster_dir)

    atexit.register(stop_at_exit)
    previous_handler = signal.signal(signal.SIGTERM, _sigterm_to_keyboard_interrupt)
    try:
        started = _run_script("start", str(cluster_dir), timeout=120)
        if started.returncode != 0:
            pytest.fail(
                f"cluster.sh start failed (rc {started.returncode}):\n{started.stdout}\n{started.stderr}",
                pytrace=False,
            )
        # The script prints `export SLURM_CONF=DIR/slurm.conf` and `export PATH=DIR/bin:$PATH`;
        # DIR/bin holds an srun wrapper that jobs need (see write_srun_wrapper in cluster.sh).
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
        )
        conf = Path(exports["SLURM_CONF"])
        path = exports["PATH"].replace("$PATH", os.environ.get("PATH", ""))
        env = dict(os.environ, SLURM_CONF=str(conf), PATH=path)
        yield SlurmCluster(dir=cluster_dir, conf=conf, env=env)
    finally:
        # A second SIGTERM must not cut the stop short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            result = _stop(cluster_dir)
            stopped = True
            if result.returncode != 0:
                # Keep the folder: its logs and pids are what is needed to clean up by hand.
                print(f"cluster.sh stop failed, left {cluster_dir}:\n{result.stderr}")
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            atexit.unregister(stop_at_exit)


def run_in_own_group(command: Sequence[str], *, timeout: float, grace_s: float = 20,
                     **kwargs) -> subprocess.CompletedProcess[str]:
    """subprocess.run(command, capture_output=True, text=True) in a new process group (session),
    killed as a group however this call ends: timeout, an exception, or SIGINT/SIGTERM reaching
    pytest (subprocess.run alone would kill only its direct child, e.g. `timeout`, and leave
    snakemake running). The group first gets SIGINT, which makes snakemake cancel its SLURM jobs,
    then SIGKILL after `grace_s` seconds."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        kill_group(process, grace_s)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the group `process` leads, SIGKILL to what is left of it after `grace_s` seconds."""
    pgid = process.pid
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            if process.poll() is None:
                try:
                    process.communicate(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.communicate()


def kill_processes_in(folder: Path) -> list[int]:
    """SIGKILL every process whose working directory is `folder` or under it; return their PIDs.
    What a cancelled SLURM job leaves: with proctrack/linuxproc (no cgroups) slurmd can lose track
    of a job step's process that its parent left behind (seen: the jobstep's snakemake, sleeping
    with its parent gone)."""
    folder = Path(folder).resolve()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed
