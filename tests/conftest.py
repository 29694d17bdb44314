import signal

import pytest
import torch

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: a one-node SLURM cluster)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """SIGTERM (what a CI timeout sends) unwinds the session like ^C: every fixture's teardown runs,
    so the services and processes the tests started (SLURM daemons, snakemake and its jobs, mlflow
    server) are stopped however the run ends."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

