import pytest
import torch

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: a one-node SLURM cluster)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
