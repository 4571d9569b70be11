import os
import secrets
import sys

import pytest
import torch

# Tests import the top-level packages (model, kernels, ...) and the harness from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def one_cpu_thread():
    """The 2 cores are shared with spawned ranks and other test processes: OpenMP threads spinning on them
    make tiny models crawl. Modules that train use it (`pytestmark = pytest.mark.usefixtures(...)`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen():
    """A fresh random generator per test; the seed is printed so a failure can be replayed."""
    seed = secrets.randbits(48)
    print(f"seed = {seed}")
    return torch.Generator().manual_seed(seed)


def cu_from_lengths(lengths, device=None):
    """Document lengths -> cu_seqlens int32 [N+1]."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)
