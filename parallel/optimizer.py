"""ZeRO-1 AdamW: each rank keeps the optimizer state of 1/N of every gradient bucket, N = its shard group.

The parameters of each `GradSync` bucket are re-homed into one flat buffer with the bucket's layout (the
parameters become views of it). Rank r of the bucket's shard group (DP x CP for dense buckets, EDP for expert
buckets; their ranks hold identical parameters and, after the sync, identical gradients) owns the contiguous
slice r of that buffer: a plain torch AdamW (fused or foreach) updates the slice in place, then the buffer is
all-gathered. Element by element this is exactly the single-process AdamW. Buckets never mix decayed (matrices)
and non-decayed (1-D) parameters, so each slice sits in one optimizer param group.

megatron-core's DistributedOptimizer is not used: it needs its own DDP wrapper and CUDA-resident buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import group_rank, group_size
from .data_parallel import DEFAULT_BUCKET_NUMEL, Bucket, GradSync


def _all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group) -> None:
    """All ranks' equal slices into `out` (torch >= 2.12 renamed all_gather_into_tensor to all_gather_single)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, shard.contiguous(), group=group)


def _make_adamw(groups, lr, betas, eps, impl):
    if impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True), "fused"
        except (RuntimeError, ValueError):
            if impl == "fused":
                raise
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True), "foreach"


class ZeroAdamW:
    """Looks like a torch optimizer to the trainer: `param_groups` (set the lr there), `step()`, `zero_grad()`."""

    def __init__(self, grad_sync: GradSync, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, impl: str = "auto"):
        self.grad_sync, self.topo = grad_sync, grad_sync.topo
        self.flat_params: list[torch.Tensor] = []
        self.shards: list[torch.nn.Parameter] = []
        decay, no_decay = [], []
        for b in grad_sync.buckets:
            flat = torch.zeros_like(b.buffer)
            for p, o in zip(b.params, b.offsets):
                view = flat[o:o + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view  # the model's parameters now live in the flat buffer
            lo, hi = self._shard_range(b)
            shard = torch.nn.Parameter(flat[lo:hi])  # aliases the buffer: AdamW updates it in place
            shard.grad = b.buffer[lo:hi]
            self.flat_params.append(flat)
            self.shards.append(shard)
            (decay if b.decay else no_decay).append(shard)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.inner, self.impl = _make_adamw([g for g in groups if g["params"]], lr, tuple(betas), eps, impl)

    def _group(self, b: Bucket):
        return self.topo.groups[b.shard_group_name]

    def _shard_range(self, b: Bucket) -> tuple[int, int]:
        g = self._group(b)
        size = b.numel // group_size(g)
        return group_rank(g) * size, (group_rank(g) + 1) * size

    @property
    def param_groups(self):
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()  # each shard's .grad is bound to its slice of the bucket's gradient buffer for good
        for flat, shard, b in zip(self.flat_params, self.shards, self.grad_sync.buckets):
            g = self._group(b)
            if group_size(g) > 1:
                # NCCL gathers in place when the input is this rank's slice of the output; gloo needs a copy.
                _all_gather_flat(flat, shard.detach() if flat.is_cuda else shard.detach().clone(), g)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad_sync.zero_grad()

    def state_dict(self):
        raise TypeError("ZeroAdamW state is sharded by layout: save it with parallel.checkpoint.save_checkpoint")

    def load_state_dict(self, state):
        raise TypeError("ZeroAdamW state is sharded by layout: load it with parallel.checkpoint.load_checkpoint")

    # ---- layout-independent state (used by parallel.checkpoint) -------------------------------------------
    @torch.no_grad()
    def full_state(self) -> tuple[dict, int]:
        """({param: {"exp_avg": t, "exp_avg_sq": t}} with t shaped like the param (this rank's TP/EP shard),
        step). Collective over each bucket's shard group."""
        out, step = {}, 0
        for flat, shard, b in zip(self.flat_params, self.shards, self.grad_sync.buckets):
            state = self.inner.state.get(shard, {})
            step = int(state["step"]) if "step" in state else step
            for key in ("exp_avg", "exp_avg_sq"):
                full = torch.zeros_like(flat)
                if key in state:
                    g = self._group(b)
                    if group_size(g) > 1:
                        _all_gather_flat(full, state[key], g)
                    else:
                        full.copy_(state[key])
                for p, o in zip(b.params, b.offsets):
                    out.setdefault(p, {})[key] = full[o:o + p.numel()].view_as(p).clone()
        return out, step

    @torch.no_grad()
    def load_full_state(self, per_param: dict, step: int) -> None:
        """Inverse of full_state: keep this rank's slice of every bucket's state."""
        for shard, b in zip(self.shards, self.grad_sync.buckets):
            lo, hi = self._shard_range(b)
            state = {"step": torch.tensor(float(step), dtype=torch.float32,
                                          device=shard.device if self.impl == "fused" else "cpu")}
            for key in ("exp_avg", "exp_avg_sq"):
                full = torch.zeros(b.numel, dtype=shard.dtype, device=shard.device)
                for p, o in zip(b.params, b.offsets):
                    full[o:o + p.numel()].copy_(per_param[p][key].reshape(-1))
                state[key] = full[lo:hi].clone()
            self.inner.state[shard] = state


def build_optimizer(model: torch.nn.Module, topo, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1, impl: str = "auto", bucket_numel: int | None = None,
                    overlap: bool | None = None) -> tuple[ZeroAdamW, GradSync]:
    """GradSync over `model` plus the ZeRO-1 AdamW on its buckets (call after `parallelize`).

    bucket_numel / overlap default to the parallel config's grad_bucket_numel / overlap_grad_reduce
    (null: 40M elements / on with CUDA)."""
    bucket_numel = bucket_numel or topo.options.get("grad_bucket_numel") or DEFAULT_BUCKET_NUMEL
    overlap = topo.options.get("overlap_grad_reduce") if overlap is None else overlap
    grad_sync = GradSync(model, topo, bucket_numel=int(bucket_numel), overlap=overlap)
    return ZeroAdamW(grad_sync, lr, betas, eps, weight_decay, impl), grad_sync
