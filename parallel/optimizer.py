"""The distributed optimizer (Megatron's design): fp32 master weights and AdamW moments of this rank's slice only.

For every `GradSync` bucket, rank r of the bucket's shard group owns slice r of the flat buffers. Its master
weights are fp32: the slice of the parameter buffer itself when parameters are fp32 (then this is exactly the
single-process torch AdamW, element by element), an fp32 copy of it when parameters are in a lower compute
dtype (bf16 on GPU). A plain torch AdamW (fused or foreach) updates the master slice from the reduce-scattered
fp32 gradient slice; the updated slice is written back in the compute dtype and the bucket all-gathered. With
`overlap_param_gather` (default on CUDA) the all-gathers run while the next forward starts: each decoder layer
(and the embedding) waits, in a forward pre-hook, only for the buckets holding its parameters, and the final
norm waits for the rest (the LM head reads its weight outside its own forward). A pipeline stage has only
some of these modules, and all its parameters are in them.
Bytes per parameter: compute dtype + 4 (main grad) + (4 master + 8 moments) / shard group size.

megatron-core's DistributedOptimizer is not used: it needs its own DDP wrapper and CUDA-resident buffers.
"""

from __future__ import annotations

import torch

from .collectives import group_size
from .data_parallel import DEFAULT_BUCKET_NUMEL, GradSync, all_gather_flat

MOMENTS = ("exp_avg", "exp_avg_sq")


def _make_adamw(groups, lr, betas, eps, impl):
    if impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True), "fused"
        except (RuntimeError, ValueError):
            if impl == "fused":
                raise
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True), "foreach"


class DistributedAdamW:
    """Looks like a torch optimizer to the trainer: `param_groups` (set the lr there), `step()`, `zero_grad()`."""

    def __init__(self, grad_sync: GradSync, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, impl: str = "auto"):
        self.grad_sync, self.topo = grad_sync, grad_sync.topo
        self.overlap_param_gather = False
        self._gathers: dict = {}  # bucket index -> the all-gather still in flight
        self.masters: list[torch.nn.Parameter] = []
        decay, no_decay = [], []
        for b in grad_sync.buckets:
            lo, hi = b.shard
            mine = b.flat_params[lo:hi]
            master = torch.nn.Parameter(mine if mine.dtype == torch.float32 else mine.float())
            master.grad = b.grad_shard
            self.masters.append(master)
            (decay if b.decay else no_decay).append(master)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.inner, self.impl = _make_adamw([g for g in groups if g["params"]], lr, tuple(betas), eps, impl)
        self.set_step(0)  # state allocated up front: what the planner counts, what a resume loads into

    @property
    def param_groups(self):
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.publish()

    @torch.no_grad()
    def publish(self) -> None:
        """Master slices -> parameters in the compute dtype -> every rank of each shard group."""
        self.wait_params()
        buckets = self.grad_sync.buckets
        for i in reversed(range(len(buckets))):  # buckets are in backward order: start the forward's first
            b, master = buckets[i], self.masters[i]
            lo, hi = b.shard
            mine = b.flat_params[lo:hi]
            if mine.data_ptr() != master.data_ptr():
                mine.copy_(master)
            group = self.grad_sync.group(b.shard_group)
            if group_size(group) > 1:
                # NCCL gathers in place when the input is this rank's slice of the output; gloo needs a copy.
                work = all_gather_flat(b.flat_params, mine if mine.is_cuda else mine.clone(), group=group,
                                       async_op=self.overlap_param_gather)
                if work is not None:
                    self._gathers[i] = work

    @torch.no_grad()
    def masters_from_parameters(self) -> None:
        """After the parameters were filled in place (e.g. from Hugging Face weights): copy them into the fp32
        master slices (fp32 parameters are their own masters)."""
        for master, b in zip(self.masters, self.grad_sync.buckets):
            lo, hi = b.shard
            if master.data_ptr() != b.flat_params[lo:hi].data_ptr():
                master.copy_(b.flat_params[lo:hi])

    def wait_params(self, buckets=None) -> None:
        """Finish the parameter all-gathers of `buckets` (indices; default all) still in flight."""
        for i in list(self._gathers) if buckets is None else buckets:
            work = self._gathers.pop(i, None)
            if work is not None:
                work.wait()

    def overlap_with_forward(self, model: torch.nn.Module) -> None:
        """Let the next forward start before every parameter has arrived (see the module docstring)."""
        index = {id(p): i for i, b in enumerate(self.grad_sync.buckets) for p in b.params}

        def waiter(module):
            buckets = sorted({index[id(p)] for p in module.parameters() if id(p) in index})
            return lambda *_: self.wait_params(buckets)

        for module in (model.embed_tokens, *model.layers.values()):
            if module is not None:  # a pipeline stage holds only some of them
                module.register_forward_pre_hook(waiter(module))
        if model.norm is not None:
            model.norm.register_forward_pre_hook(lambda *_: self.wait_params())
        self.overlap_param_gather = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad_sync.zero_grad()

    def slices(self):
        """Per bucket: (bucket, master slice, {moment: slice})."""
        for master, b in zip(self.masters, self.grad_sync.buckets):
            yield b, master, {k: self.inner.state[master][k] for k in MOMENTS}

    @property
    def step_count(self) -> int:
        return int(self.inner.state[self.masters[0]]["step"])

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        """Set AdamW's step count; the moments are allocated (zero) on first use, so a resume can load into them."""
        for master in self.masters:
            device = master.device if self.impl == "fused" else "cpu"
            state = self.inner.state[master]
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(master, memory_format=torch.preserve_format))
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


def build_optimizer(model: torch.nn.Module, topo, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1, impl: str = "auto", bucket_numel: int | None = None,
                    overlap: bool | None = None, overlap_param_gather: bool | None = None
                    ) -> tuple[DistributedAdamW, GradSync]:
    """GradSync over `model` plus the distributed AdamW on its buckets (call after `parallelize`).

    bucket_numel / overlap / overlap_param_gather default to the parallel config's grad_bucket_numel /
    overlap_grad_reduce / overlap_param_gather (null: 40M elements / on with CUDA / on with CUDA)."""
    options = topo.options
    bucket_numel = bucket_numel or options.get("grad_bucket_numel") or DEFAULT_BUCKET_NUMEL
    overlap = options.get("overlap_grad_reduce") if overlap is None else overlap
    grad_sync = GradSync(model, topo, bucket_numel=int(bucket_numel), overlap=overlap)
    optimizer = DistributedAdamW(grad_sync, lr, betas, eps, weight_decay, impl)
    if overlap_param_gather is None:
        overlap_param_gather = options.get("overlap_param_gather")
    if overlap_param_gather is None:
        overlap_param_gather = grad_sync.buckets[0].flat_params.is_cuda
    if overlap_param_gather:
        optimizer.overlap_with_forward(model)
    return optimizer, grad_sync
