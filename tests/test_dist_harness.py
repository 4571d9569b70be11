import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    return rank


def test_harness_runs_collectives():
    assert run_distributed(_all_reduce, 2) == [3.0, 3.0]


def test_harness_reports_rank_errors():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_distributed(_fail, 2)
