"""What the training loop needs from a process layout, for `parallel=single` and for parallel/'s layouts.

- `PlainLayout` (parallel=single): every process holds the whole model and a plain torch AdamW; world > 1 is
  plain data parallelism (one flattened all_reduce of the gradients). The fast, bitwise-resumable path.
- `ParallelLayout` (every other parallel=...): `Topology` + `parallelize` (TP/SP, CP, EP x ETP x EDP) + parallel's
  bucketed `GradSync` and ZeRO-1 AdamW. All TP and CP ranks of a DP replica read the same windows
  (`data_parallel_slice`); CP ranks then keep their zigzag chunks (`parallel.zigzag.shard_batch`).

Both expose the same small interface: `dp` / `dp_rank` (which windows this rank trains on), `local_inputs`
(the rank's part of a micro-batch), `accumulate` (gradient accumulation context), `sync_and_clip` (gradient
sync + global-norm clipping), `reduce_step_stats` (metric sums over the right groups), and checkpoint IO in
`trainer.layout_checkpoint`. `check_layout` validates the parallel config before any work is done.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import layout_checkpoint
from .config import ConfigError
from .distributed import DistEnv, all_reduce_sum, sum_gradients, wrap_model

PLAIN_LAYOUT = "single"
SIZE_KEYS = ("tp", "cp", "ep", "etp", "pp", "sequence_parallel")


@dataclass(frozen=True)
class LayoutSpec:
    """The checked parallel config: what plan_run needs before any process group or model exists."""

    name: str
    plain: bool
    dp: int  # data-parallel replicas (windows of a global batch are split over them)
    description: str


def _check_options(parallel_cfg, optim_cfg) -> None:
    from parallel.global_router import ROUTER_MODES
    from parallel.lasp import LASP_MODES

    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    name = parallel_cfg.name
    router_mode = parallel_cfg.get("router_mode", "global")
    need(router_mode in ROUTER_MODES, f"parallel.router_mode={router_mode!r} must be one of {'|'.join(ROUTER_MODES)}")
    lasp_mode = parallel_cfg.get("lasp_mode", "allgather")
    need(lasp_mode in LASP_MODES, f"parallel.lasp_mode={lasp_mode!r} must be one of {'|'.join(LASP_MODES)}")
    groups = parallel_cfg.get("moe_overlap_groups", 1)
    need(isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1,
         f"parallel.moe_overlap_groups={groups!r} must be a positive integer")
    bucket = parallel_cfg.get("grad_bucket_numel")
    need(bucket is None or (isinstance(bucket, int) and not isinstance(bucket, bool) and bucket > 0),
         f"parallel.grad_bucket_numel={bucket!r} must be a positive integer or null")
    overlap = parallel_cfg.get("overlap_grad_reduce")
    need(overlap is None or isinstance(overlap, bool), f"parallel.overlap_grad_reduce={overlap!r} must be true|false|null")
    need(optim_cfg.impl != "apex", f"optim.impl=apex is not available with parallel={name} (its ZeRO-1 optimizer "
                                   f"shards torch AdamW); use optim.impl=auto|fused|foreach")


def check_layout(parallel_cfg, optim_cfg, world_size: int, model_cfg, seq_len: int) -> LayoutSpec:
    """Validate `cfg.parallel` for this world size, model and window length; ConfigError naming the setting."""
    name = str(parallel_cfg.name)
    if name == PLAIN_LAYOUT:
        return LayoutSpec(name, True, world_size, f"single (plain data parallel x{world_size})")
    from parallel.topology import validate_layout

    sizes = {k: parallel_cfg[k] for k in SIZE_KEYS if k in parallel_cfg}
    try:
        validate_layout(world_size, **sizes, model_cfg=model_cfg, seq_len=seq_len)
    except ValueError as exc:
        raise ConfigError(f"{exc} (parallel={name}, world size {world_size})") from None
    _check_options(parallel_cfg, optim_cfg)
    tp, cp, pp = (int(sizes.get(k, 1)) for k in ("tp", "cp", "pp"))
    ep, etp = int(sizes.get("ep", 1)), int(sizes.get("etp", 1))
    dp = world_size // (tp * cp * pp)
    sp = bool(sizes.get("sequence_parallel", False)) and tp > 1
    description = (f"{name} (tp={tp}{' sp' if sp else ''} cp={cp} dp={dp} ep={ep} etp={etp} "
                   f"edp={world_size // (ep * etp * pp)}")
    if ep * etp > 1:
        description += f" router={parallel_cfg.get('router_mode', 'global')}"
    if cp > 1:
        description += f" lasp={parallel_cfg.get('lasp_mode', 'allgather')}"
    return LayoutSpec(name, False, dp, description + ")")


def build_layout(spec: LayoutSpec, cfg, env: DistEnv, model: torch.nn.Module, model_factory):
    """The runtime layout for the whole model `model` (on its device); `model_factory()` builds another one."""
    if spec.plain:
        from .optim import build_optimizer

        model = wrap_model(model, env)
        optimizer, impl = build_optimizer(model, cfg.optim)
        return PlainLayout(spec, env, model, optimizer, impl)
    return ParallelLayout(spec, cfg, env, model, model_factory)


class PlainLayout:
    def __init__(self, spec: LayoutSpec, env: DistEnv, model, optimizer, optimizer_impl: str):
        self.spec, self.env, self.model, self.optimizer = spec, env, model, optimizer
        self.optimizer_impl = optimizer_impl
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dp, self.dp_rank = env.world_size, env.rank
        self.dp_group = None  # the default group: every process is its own replica

    def local_inputs(self, micro_batch: dict) -> dict:
        return micro_batch

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def sync_and_clip(self, max_norm: float) -> float:
        sum_gradients(self.params, self.env)
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True))

    def reduce_step_stats(self, dp_cp_stats: torch.Tensor, world_stats: torch.Tensor):
        """Every rank is its own replica here: one all_reduce of both."""
        both = all_reduce_sum(torch.cat([dp_cp_stats, world_stats]), self.env)
        return both[:dp_cp_stats.numel()], both[dp_cp_stats.numel():]

    def save_checkpoint(self, root, step, extra, config_yaml, meta, keep_last):
        return layout_checkpoint.save_plain(self, root, step, extra, config_yaml, meta, keep_last)

    def load_checkpoint(self, path) -> dict:
        return layout_checkpoint.load_into_plain(self, path)


class ParallelLayout:
    def __init__(self, spec: LayoutSpec, cfg, env: DistEnv, model, model_factory):
        from parallel import Topology, build_optimizer, parallelize

        self.spec, self.env, self.model_factory = spec, env, model_factory
        self.seq_len = int(cfg.stage.seq_len)
        self.topo = Topology.from_config(cfg.parallel, model.cfg, seq_len=self.seq_len)
        self.model = parallelize(model, self.topo)
        o = cfg.optim
        self.optimizer, self.grad_sync = build_optimizer(
            self.model, self.topo, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps),
            weight_decay=float(o.weight_decay), impl=o.impl)
        self.optimizer_impl = f"zero1-{self.optimizer.impl}"
        self.dp, self.dp_rank, self.dp_group = self.topo.dp, self.topo.dp_rank, self.topo.dp_group

    def local_inputs(self, micro_batch: dict) -> dict:
        if self.topo.cp == 1:
            return micro_batch
        from parallel.zigzag import shard_batch

        return shard_batch(micro_batch, self.seq_len, self.topo.cp_rank, self.topo.cp)

    def accumulate(self, last: bool):
        """Only the last micro-batch's backward starts the gradient all-reduces."""
        return contextlib.nullcontext() if last else self.grad_sync.no_sync()

    def sync_and_clip(self, max_norm: float) -> float:
        self.grad_sync.finish()
        return self.grad_sync.clip_grad_norm_(max_norm)

    def _sum(self, values: torch.Tensor, group) -> torch.Tensor:
        if self.topo.world_size > 1:
            dist.all_reduce(values, group=group)
        return values

    def reduce_step_stats(self, dp_cp_stats: torch.Tensor, world_stats: torch.Tensor):
        """Loss sums over DP x CP (every TP rank holds its micro-batch's whole loss; CP ranks hold disjoint
        tokens); MoE sums over all ranks (each rank reports its router group's or its own counts)."""
        return self._sum(dp_cp_stats, self.topo.dp_cp_group), self._sum(world_stats, None)

    def save_checkpoint(self, root, step, extra, config_yaml, meta, keep_last):
        return layout_checkpoint.save_parallel(self, root, step, extra, config_yaml, meta, keep_last)

    def load_checkpoint(self, path) -> dict:
        return layout_checkpoint.load_into_parallel(self, path)
