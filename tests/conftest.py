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


# The suite runs on 2 worker processes (pytest-xdist, `-n 2` in pyproject.toml): most tests use one
# core, and the workflow runs wait on process start-ups, so one process leaves a 2-core machine
# idle a third of the time. A module's tests stay on one worker (its module fixtures, e.g. a whole
# DAG run, run once), and the modules that use the SLURM test cluster share one (one cluster per
# machine). The long modules are handed out first, so that none of them starts last.
SLURM_MODULES = ("test_slurm_cluster", "test_reliability")
LONG_FIRST = ("test_workflow", *SLURM_MODULES, "test_paper_run", "test_stages", "test_search_any_network",
              "test_tracking", "test_import", "test_search")


def pytest_collection_modifyitems(config, items):
    def module(item) -> str:
        return item.module.__name__.rsplit(".", 1)[-1]

    for item in items:
        name = module(item)
        item.add_marker(pytest.mark.xdist_group("slurm" if name in SLURM_MODULES else name))
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: the order within a module stays
