"""Data-parallel gradient sync: bucketed, overlapped with backward on GPU, and the distributed gradient norm.

Each parameter's gradient is summed over the ranks that hold the same parameter but saw different tokens:
- dense parameters over DP x CP (`dp_cp`);
- dense parameters that are replicated over TP but fed different tokens there (SP norms, the MoE router:
  `tp_partial_grad`) over TP x DP x CP (`tp_dp_cp`);
- expert parameters over EDP (`edp`; with MoE parallel folding it contains every rank holding that shard).
Summing (not averaging) is right because the trainer divides the loss by the global label-token count.

Gradients accumulate into one flat fp32-or-param-dtype buffer per bucket (a post-accumulate-grad hook adds
`p.grad` into the bucket and frees it). With `overlap` (default on CUDA) a bucket's all-reduce starts as soon as
its last gradient has arrived in the last micro-batch's backward; buckets always start in the same order on
every rank, so the collectives match. `finish()` waits, then exposes `p.grad` as views of the buffers, so
clipping and the optimizer see ordinary gradients. Call `zero_grad()` (or the optimizer's) before the next step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .collectives import group_size
from .topology import Topology

DEFAULT_BUCKET_NUMEL = 40_000_000  # megatron-core's default bucket size (elements)


def is_expert_param(name: str, param) -> bool:
    return getattr(param, "expert_parallel", False) or ".experts." in name


def reduction_group(name: str, param) -> str:
    """Topology group name over which this parameter's gradient is summed."""
    if is_expert_param(name, param):
        return "edp"
    return "tp_dp_cp" if getattr(param, "tp_partial_grad", False) else "dp_cp"


def replica_count(name: str, param, topo: Topology) -> int:
    """Ranks holding an identical copy of this (shard of a) parameter after the sync."""
    if is_expert_param(name, param):
        return topo.edp
    tp_sharded = getattr(param, "tp_partition_dim", None) is not None
    return topo.dp_cp * (1 if tp_sharded else topo.tp)


@dataclass
class Bucket:
    group_name: str  # reduction group
    decay: bool  # weight decay applies (matrices) -- keeps ZeRO shards in one optimizer param group
    names: list
    params: list
    shard_group_name: str  # ZeRO-1 shards this bucket over this group (its ranks hold identical copies)
    offsets: list = field(default_factory=list)
    buffer: torch.Tensor | None = None  # flat gradients, padded to a multiple of the shard group size
    views: list = field(default_factory=list)
    norm_weights: torch.Tensor | None = None  # 1 / replicas of each parameter, for the global gradient norm
    ready: int = 0
    work: object = None

    @property
    def numel(self) -> int:
        return self.buffer.numel()


class GradSync:
    def __init__(self, model: torch.nn.Module, topo: Topology, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 overlap: bool | None = None):
        self.topo = topo
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("GradSync: the model has no trainable parameters")
        self.overlap = named[0][1].is_cuda if overlap is None else overlap
        self.buckets: list[Bucket] = []
        open_buckets: dict[tuple, Bucket] = {}
        # Reverse registration order approximates the order gradients arrive in backward.
        for name, p in reversed(named):
            group = reduction_group(name, p)
            key = (group, p.dtype, p.device, p.ndim >= 2)
            if key not in open_buckets:
                open_buckets[key] = Bucket(group, p.ndim >= 2, [], [], "edp" if group == "edp" else "dp_cp")
            b = open_buckets[key]
            b.names.append(name)
            b.params.append(p)
            if sum(q.numel() for q in b.params) >= bucket_numel:
                self.buckets.append(open_buckets.pop(key))
        self.buckets.extend(open_buckets.values())
        for b in self.buckets:
            self._allocate(b)
        self._param_bucket = {p: (b, v) for b in self.buckets for p, v in zip(b.params, b.views)}
        self._sync_now, self._next, self._exposed = True, 0, False
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _allocate(self, b: Bucket) -> None:
        n = self.topo.size(b.shard_group_name)
        total = 0
        for p in b.params:
            b.offsets.append(total)
            total += p.numel()
        padded = math.ceil(total / n) * n
        p0 = b.params[0]
        b.buffer = torch.zeros(padded, dtype=p0.dtype, device=p0.device)
        b.views = [b.buffer[o:o + p.numel()].view_as(p) for o, p in zip(b.offsets, b.params)]
        b.norm_weights = torch.tensor([1.0 / replica_count(n, p, self.topo) for n, p in zip(b.names, b.params)],
                                      dtype=torch.float64, device=p0.device)

    def group(self, b: Bucket):
        return self.topo.groups[b.group_name]

    # ---- backward ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if self._exposed:
            raise RuntimeError("GradSync: call zero_grad() after the optimizer step before the next backward")
        b, view = self._param_bucket[p]
        view.add_(p.grad)
        p.grad = None
        if self._sync_now and self.overlap:
            b.ready += 1
            while self._next < len(self.buckets) and \
                    self.buckets[self._next].ready == len(self.buckets[self._next].params):
                self._launch(self.buckets[self._next])
                self._next += 1

    def _launch(self, b: Bucket) -> None:
        group = self.group(b)
        if group_size(group) > 1:
            b.work = dist.all_reduce(b.buffer, group=group, async_op=True)

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches before the last: gradients only accumulate (no early all-reduce)."""
        previous, self._sync_now = self._sync_now, False
        try:
            yield
        finally:
            self._sync_now = previous

    @torch.no_grad()
    def finish(self) -> None:
        """After the last backward of a step: complete every bucket's all-reduce and expose `p.grad`."""
        for b in self.buckets[self._next:]:
            self._launch(b)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
            b.ready = 0
            for p, v in zip(b.params, b.views):
                p.grad = v
        self._next, self._exposed = 0, True

    @torch.no_grad()
    def zero_grad(self) -> None:
        for b in self.buckets:
            b.buffer.zero_()
            for p in b.params:
                p.grad = None
        self._exposed = False

    # ---- after the sync ---------------------------------------------------------------------------------
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradient of the whole (unsharded, unreplicated) model; same on every rank."""
        total = torch.zeros((), dtype=torch.float64, device=self.buckets[0].buffer.device)
        for b in self.buckets:
            norms = torch.stack(torch._foreach_norm(b.views)).double()
            total += (norms.square() * b.norm_weights).sum()
        if self.topo.world_size > 1:
            dist.all_reduce(total)
        return total.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the distributed model; returns the norm before clipping."""
        norm = self.grad_norm()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for b in self.buckets:
                b.buffer.mul_(coef.to(b.buffer.dtype))
        return float(norm)
