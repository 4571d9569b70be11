"""Autograd-aware collectives that work on gloo (CPU) and NCCL (GPU).

megatron-core's tensor-parallel mappings allocate on the current CUDA device unconditionally, so they cannot
serve the CPU test bed; these are the small device-agnostic equivalents. Every function is the identity when
the group is None or has one rank.
"""

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n, r = group_size(group), group_rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: size {x.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x.chunk(n, dim=dim)[r].contiguous()
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[r])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None


def all_gather(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's x along dim; backward sums the gradient and returns this rank's slice."""
    return x if group_size(group) == 1 else _AllGather.apply(x, group, dim)


def reduce_scatter(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Sum over ranks, keep this rank's slice along dim; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatter.apply(x, group, dim)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks; backward is the identity (each rank's output gradient is already the full one)."""
    return x if group_size(group) == 1 else _AllReduce.apply(x, group)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward sums the gradient over ranks (x fed to rank-local partial computations)."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Uneven all-to-all along dim 0: input_splits[i] rows go to rank i, output_splits[i] come from rank i."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def all_gather_sizes(n: int, group, device=None) -> list[int]:
    """Every rank's integer n, in rank order."""
    if group_size(group) == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=device)
    return [int(v) for v in _all_gather(t, group, 0)]
