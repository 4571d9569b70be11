"""The gradient half of the distributed optimizer: flat buckets, fp32 main grads, reduce-scatter, global norm.

Every trainable parameter lives in a bucket of parameters alike in everything the sync needs (`ShardSpec`'s
grad and shard groups and replica count, weight decay, dtype, device). A bucket holds
- `params`: one flat buffer in the compute dtype; the model's parameters are views of it;
- `main_grad`: one flat fp32 buffer; a post-accumulate-grad hook adds each `p.grad` into it and frees `p.grad`,
  so micro-batches accumulate in fp32 whatever the compute dtype.
Both are padded to a multiple of the shard group (DP x CP for dense parameters, EDP for experts: the ranks
holding identical copies). After the last micro-batch's backward each bucket's `main_grad` is reduce-scattered
over that group: rank r keeps slice r (`grad_shard`: in place, the slice of `main_grad` itself, except on CPU
where gloo needs a separate output), summed over every rank that saw other tokens; parameters
partial over TP (SP norms, the router) are then summed over TP too, slice only. With `overlap` (default on
CUDA) a bucket's reduce-scatter starts as soon as its last gradient has arrived, while the backward goes on;
buckets start in the same order on every rank, so the collectives match.
Summing (not averaging) is right because the trainer divides the loss by the global label-token count.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .collectives import group_rank, group_size
from .shard import spec_of
from .topology import Topology

DEFAULT_BUCKET_NUMEL = 40_000_000  # megatron-core's default bucket size (elements)
NORM_CHUNK = 1 << 22
# torch >= 2.12 renamed the flat collectives; older releases only have the *_tensor names.
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Bucket:
    grad_group: str  # the gradient is summed over this group ...
    shard_group: str  # ... by a reduce-scatter over this one (plus an all-reduce over TP when they differ)
    decay: bool  # weight decay applies (matrices): keeps each optimizer slice in one param group
    norm_weight: float  # shard group size / replicas: every logical element counts once in the global norm
    names: list
    params: list
    offsets: list = field(default_factory=list)
    flat_params: torch.Tensor | None = None  # compute dtype; the parameters are views of it
    main_grad: torch.Tensor | None = None  # fp32
    shard: tuple = (0, 0)  # this rank's slice [lo, hi) of the flat buffers
    grad_shard: torch.Tensor | None = None  # fp32 [hi - lo]: the summed gradient of this rank's slice
    ready: int = 0
    work: object = None

    @property
    def numel(self) -> int:
        return self.flat_params.numel()


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
            spec = spec_of(p)
            weight = topo.size(spec.shard_group) / spec.replicas(topo)
            key = (spec.grad_group, spec.shard_group, weight, p.dtype, p.device, p.ndim >= 2)
            if key not in open_buckets:
                open_buckets[key] = Bucket(spec.grad_group, spec.shard_group, p.ndim >= 2, weight, [], [])
            b = open_buckets[key]
            b.names.append(name)
            b.params.append(p)
            if sum(q.numel() for q in b.params) >= bucket_numel:
                self.buckets.append(open_buckets.pop(key))
        self.buckets.extend(open_buckets.values())
        for b in self.buckets:
            self._allocate(b)
        self._param_bucket = {p: (b, o) for b in self.buckets for p, o in zip(b.params, b.offsets)}
        self._sync_now, self._next = True, 0
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    @torch.no_grad()
    def _allocate(self, b: Bucket) -> None:
        group = self.topo.groups[b.shard_group]
        n = group_size(group)
        total = 0
        for p in b.params:
            b.offsets.append(total)
            total += p.numel()
        padded = math.ceil(total / n) * n
        p0 = b.params[0]
        b.flat_params = torch.zeros(padded, dtype=p0.dtype, device=p0.device)
        b.main_grad = torch.zeros(padded, dtype=torch.float32, device=p0.device)
        for p, o in zip(b.params, b.offsets):
            view = b.flat_params[o:o + p.numel()].view_as(p)
            view.copy_(p.data)
            p.data = view  # the model's parameters now live in the flat buffer
        size = padded // n
        b.shard = (group_rank(group) * size, (group_rank(group) + 1) * size)
        in_place = n == 1 or p0.device.type != "cpu"  # NCCL reduce-scatters into a slice of its input
        b.grad_shard = b.main_grad[b.shard[0]:b.shard[1]] if in_place else b.main_grad.new_zeros(size)

    def group(self, name: str):
        return self.topo.groups[name]

    # ---- backward ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _on_grad(self, p: torch.nn.Parameter) -> None:
        b, offset = self._param_bucket[p]
        b.main_grad[offset:offset + p.numel()].add_(p.grad.reshape(-1))
        p.grad = None
        if self._sync_now and self.overlap:
            b.ready += 1
            while self._next < len(self.buckets) and \
                    self.buckets[self._next].ready == len(self.buckets[self._next].params):
                self._launch(self.buckets[self._next])
                self._next += 1

    def _launch(self, b: Bucket) -> None:
        group = self.group(b.shard_group)
        if group_size(group) > 1:
            b.work = reduce_scatter_flat(b.grad_shard, b.main_grad, group=group, async_op=True)

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches before the last: gradients only accumulate (no early reduce-scatter)."""
        previous, self._sync_now = self._sync_now, False
        try:
            yield
        finally:
            self._sync_now = previous

    @torch.no_grad()
    def finish(self) -> None:
        """After the last backward of a step: complete every bucket's reduce-scatter (and TP sum)."""
        for b in self.buckets[self._next:]:
            self._launch(b)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
            if b.grad_group != b.shard_group and group_size(self.group("tp")) > 1:
                dist.all_reduce(b.grad_shard, group=self.group("tp"))
            b.ready = 0
        self._next = 0

    @torch.no_grad()
    def zero_grad(self) -> None:
        for b in self.buckets:
            b.main_grad.zero_()
            b.grad_shard.zero_()

    # ---- after the sync ---------------------------------------------------------------------------------
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradient of the whole (unsharded, unreplicated) model; same on every rank."""
        total = torch.zeros((), dtype=torch.float64, device=self.buckets[0].main_grad.device)
        for b in self.buckets:
            # fp64 sums of squares over chunks: the CPU's fp32 norm of a large buffer is off by ~1e-4, and a
            # whole fp64 copy would cost 8 bytes per element
            for chunk in b.grad_shard.split(NORM_CHUNK):
                total += chunk.double().square().sum() * b.norm_weight
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
                b.grad_shard.mul_(coef.to(b.grad_shard.dtype))
        return float(norm)

    def param_grads(self) -> dict:
        """{name: summed fp32 gradient of this rank's whole block} (tests: all-gathers every slice)."""
        out = {}
        for b in self.buckets:
            full = b.grad_shard
            if group_size(self.group(b.shard_group)) > 1:
                full = b.main_grad.new_empty(b.numel)
                all_gather_flat(full, b.grad_shard.contiguous(), group=self.group(b.shard_group))
            for name, p, o in zip(b.names, b.params, b.offsets):
                out[name] = full[o:o + p.numel()].view(p.shape).clone()
        return out
