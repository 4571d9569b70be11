"""Each autograd collective against its single-process meaning: values and gradients."""

import torch
import torch.distributed as dist
from dist_harness import run_distributed

from parallel.collectives import (
    all_gather,
    all_gather_sizes,
    all_reduce,
    all_to_all,
    copy_to_group,
    reduce_scatter,
)


def _check(rank, world):
    g = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    full = torch.randn(world * 2, 3, dtype=torch.float64)  # same on every rank
    weights = torch.randn(world * 2, 3, dtype=torch.float64)
    mine = full.chunk(world)[rank].clone().requires_grad_()
    # all_gather: d/dx sum(w * gather(x)) summed over ranks = world * w_slice (every rank uses the same w)
    (all_gather(mine, g) * weights).sum().backward()
    torch.testing.assert_close(mine.grad, world * weights.chunk(world)[rank])

    x = (full * (rank + 1)).requires_grad_()
    y = reduce_scatter(x, g)
    scale = sum(range(1, world + 1))
    torch.testing.assert_close(y, (full * scale).chunk(world)[rank])
    (y * weights.chunk(world)[rank]).sum().backward()
    torch.testing.assert_close(x.grad, weights)  # gradient of the sum is the gathered upstream gradient

    x = full.clone().requires_grad_()
    z = all_reduce(x * (rank + 1), g)
    torch.testing.assert_close(z, full * scale)
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(full, rank + 1.0))

    x = full.clone().requires_grad_()
    (copy_to_group(x, g) * (rank + 1)).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(full, float(scale)))

    # uneven all-to-all: rank r sends i+r+1 rows to rank i
    send = [i + rank + 1 for i in range(world)]
    recv = [rank + i + 1 for i in range(world)]
    x = torch.arange(sum(send), dtype=torch.float64).mul(rank + 1).requires_grad_()
    y = all_to_all(x[:, None], recv, send, g)
    assert y.shape[0] == sum(recv)
    (y.squeeze(1) * torch.arange(y.shape[0])).sum().backward()
    assert all_gather_sizes(rank + 5, g) == [r + 5 for r in range(world)]
    return y.squeeze(1).tolist(), x.grad.tolist()


def test_collectives_values_and_grads():
    world = 2
    results = run_distributed(_check, world)
    # rank 0 receives from rank 0 its first 1 row (values 0) and from rank 1 its first 2 rows (0, 2)
    assert results[0][0] == [0.0, 0.0, 2.0]
    # rank 1 receives rows 1..2 of rank 0 ([1, 2]) and rows 2..4 of rank 1 ([4, 6, 8])
    assert results[1][0] == [1.0, 2.0, 4.0, 6.0, 8.0]
    # gradient of a2a = reverse a2a of the upstream gradient (position indices on the receiver)
    assert results[0][1] == [0.0, 0.0, 1.0]
    assert results[1][1] == [1.0, 2.0, 2.0, 3.0, 4.0]
