"""One shard description per parameter, and building a rank's part of the model without the whole model.

`parallelize` sets `param.shard` (a `ShardSpec`) on every parameter: the logical shape, this rank's block of
it, the dims split over which parallel axes, and the group its gradient is summed over. Initialisation
(`materialize`), gradient sync and the distributed optimizer (`parallel.data_parallel`, `parallel.optimizer`),
checkpoints (`parallel.checkpoint`) and the memory planner (`trainer.plan`) read only this.

Construction: the model is built on the meta device, `parallelize` cuts every parameter to this rank's block
(still meta), then `materialize` allocates the blocks and fills each with its part of the logical
initialisation (`model.init`). No rank allocates, initialises or receives an element it does not own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from model.init import init_block_


@dataclass(frozen=True)
class ShardSpec:
    shape: tuple  # logical (whole-model) shape
    offsets: tuple  # this rank's block is [offsets, offsets + local_shape) of the logical tensor
    local_shape: tuple
    splits: tuple = ()  # ((dim, axis), ...): dims split over the topology groups named by axis ("tp", "ep", "etp")
    expert: bool = False  # expert weights: gradients summed over EDP
    partial_over_tp: bool = False  # replicated over TP but fed different tokens (SP norms, the router)

    @classmethod
    def whole(cls, shape) -> ShardSpec:
        return cls(tuple(shape), (0,) * len(shape), tuple(shape))

    @property
    def grad_group(self) -> str:
        """The topology group this parameter's gradient is summed over."""
        if self.expert:
            return "edp"
        return "tp_dp_cp" if self.partial_over_tp else "dp_cp"

    @property
    def shard_group(self) -> str:
        """The ranks holding identical copies of this block (the distributed optimizer slices over them)."""
        return "edp" if self.expert else "dp_cp"

    def replicas(self, topo) -> int:
        """Ranks holding this same block: the world divided by the pipeline stages (a parameter lives on one)
        and by the groups it is split over."""
        return topo.world_size // (topo.pp * math.prod(topo.size(axis) for _, axis in self.splits))

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)


def spec_of(param: torch.Tensor) -> ShardSpec:
    return getattr(param, "shard", None) or ShardSpec.whole(param.shape)


def shard_parameter(module: nn.Module, attr: str, splits, expert: bool = False) -> nn.Parameter:
    """Keep this rank's block of `module.<attr>`: splits = [(dim, axis, group size, rank in group), ...]."""
    full = getattr(module, attr)
    spec = spec_of(full)
    local, offsets, named = full.detach(), list(spec.offsets), list(spec.splits)
    for dim, axis, size, rank in splits:
        if size == 1:
            continue
        n = local.shape[dim] // size
        local = local.narrow(dim, rank * n, n)
        offsets[dim] += rank * n
        named.append((dim, axis))
    param = nn.Parameter(local.clone(), requires_grad=full.requires_grad)
    param.shard = replace(spec, offsets=tuple(offsets), local_shape=tuple(local.shape), splits=tuple(named),
                          expert=expert or spec.expert)
    setattr(module, attr, param)
    return param


def mark_partial_over_tp(param: nn.Parameter) -> None:
    param.shard = replace(spec_of(param), partial_over_tp=True)


def finish_specs(model: nn.Module) -> None:
    """Every parameter gets its spec (unsplit ones: the whole tensor); expert weights are marked as such."""
    from model.moe import SwiGLUExperts

    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.shard = replace(spec_of(p), expert=spec_of(p).expert or isinstance(module, SwiGLUExperts))


@torch.no_grad()
def materialize(model: nn.Module, device, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Allocate every (meta) parameter's block on `device` and initialise it; tied parameters stay tied."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                spec = spec_of(p)
                block = torch.empty(spec.local_shape, device=device, dtype=dtype)
                init_block_(block, model.cfg, name_of[id(p)], spec.shape, spec.offsets, seed)
                made[id(p)] = nn.Parameter(block, requires_grad=p.requires_grad)
                made[id(p)].shard = spec
            module._parameters[attr] = made[id(p)]
    return model
