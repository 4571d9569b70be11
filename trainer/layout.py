"""The process layout the training loop runs on: `Topology` + sharded model + distributed optimizer.

One path for every `parallel=...`, `single` included (all sizes 1: plain data parallelism over the world).
The model is built on the meta device, `parallelize` cuts every parameter to this rank's block and
`materialize` allocates and initialises only those blocks (`parallel.shard`); gradients go through parallel's
bucketed `GradSync` into the distributed AdamW (`parallel.optimizer`). All TP and CP ranks of a DP replica read
the same windows; CP ranks then keep their zigzag chunks (`parallel.zigzag.shard_batch`).

Under pipeline parallelism (`parallel.pipeline`) every pipeline rank of a replica reads the same windows and
`forward_backward` runs them through the schedule instead of one micro-batch after another.

The loop uses `dp` / `dp_rank` / `dp_group` (which windows this rank trains on), `local_inputs` (the rank's
part of a micro-batch), `forward_backward` (a step's micro-batches), `sync_and_clip` (gradient sync +
global-norm clipping), `reduce_step_stats` (metric sums over the right groups) and the checkpoint IO.
`check_layout` validates the parallel config before any work is done.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from kernels.cu_seqlens import remember_cu_seqlens

from . import checkpoint as ckpt
from .config import ConfigError
from .distributed import DistEnv, barrier
from .logger import say

SIZE_KEYS = ("tp", "cp", "ep", "etp", "pp", "sequence_parallel")


@dataclass(frozen=True)
class LayoutSpec:
    """The checked parallel config: what plan_run needs before any process group or model exists."""

    name: str
    dp: int  # data-parallel replicas (windows of a global batch are split over them)
    description: str
    pipeline: object = None  # parallel.pipeline.PipelinePlan when pp > 1


def _check_options(parallel_cfg) -> None:
    from parallel.global_router import ROUTER_MODES
    from parallel.lasp import LASP_MODES

    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

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


def check_layout(parallel_cfg, world_size: int, model_cfg, seq_len: int) -> LayoutSpec:
    """Validate `cfg.parallel` for this world size, model and window length; ConfigError naming the setting."""
    name = str(parallel_cfg.name)
    from parallel.topology import validate_layout

    sizes = {k: parallel_cfg[k] for k in SIZE_KEYS if k in parallel_cfg}
    try:
        validate_layout(world_size, **sizes, model_cfg=model_cfg, seq_len=seq_len)
    except ValueError as exc:
        raise ConfigError(f"{exc} (parallel={name}, world size {world_size})") from None
    _check_options(parallel_cfg)
    tp, cp, pp = (int(sizes.get(k, 1)) for k in ("tp", "cp", "pp"))
    pipeline = None
    if pp > 1:
        from parallel.pipeline import plan_pipeline

        try:
            pipeline = plan_pipeline(model_cfg, pp, parallel_cfg.get("pp_schedule", "1f1b"),
                                     parallel_cfg.get("virtual_stages", 1), parallel_cfg.get("pp_layers"), seq_len)
        except ValueError as exc:
            raise ConfigError(f"{exc} (parallel={name})") from None
    ep, etp = int(sizes.get("ep", 1)), int(sizes.get("etp", 1))
    dp = world_size // (tp * cp * pp)
    sp = bool(sizes.get("sequence_parallel", False)) and tp > 1
    description = (f"{name} (tp={tp}{' sp' if sp else ''} cp={cp} dp={dp} ep={ep} etp={etp} "
                   f"edp={world_size // (ep * etp * pp)}")
    if ep * etp > 1:
        description += f" router={parallel_cfg.get('router_mode', 'global')}"
    if cp > 1:
        description += f" lasp={parallel_cfg.get('lasp_mode', 'allgather')}"
    if pipeline is not None:
        description += (f" pp={pp} {pipeline.schedule} layers/stage="
                        f"{'-'.join(str(len(s)) for s in pipeline.stage_layers)}")
    return LayoutSpec(name, dp, description + ")", pipeline)


def check_batches(batch_schedule, spec: LayoutSpec, micro_batch_size: int, seq_len: int) -> list[int]:
    """Every global batch splits into micro-batches over the DP ranks, enough for the pipeline schedule;
    returns the micro-batches per rank of each schedule entry."""
    batch_schedule.check_divisible(micro_batch_size, seq_len, spec.dp)
    micro = [batch // (micro_batch_size * seq_len * spec.dp) for _, batch in batch_schedule.entries]
    for i, n in enumerate(micro):
        if spec.pipeline is not None:
            try:
                spec.pipeline.check_micro_batches(n)
            except ValueError as exc:
                raise ConfigError(f"{exc} (schedule.batch[{i}].global_batch_tokens="
                                  f"{batch_schedule.entries[i][1]})") from None
    return micro


def build_model_on_meta(model_cfg, topo, recompute: bool):
    """This rank's part of the model with every parameter cut to its block, nothing allocated."""
    from model import MiniMaxForCausalLM
    from parallel import parallelize

    with torch.device("meta"):
        model = MiniMaxForCausalLM(model_cfg, recompute=recompute)
    return parallelize(model, topo)


def build_model(model_cfg, topo, device, seed: int, recompute: bool, dtype: torch.dtype = torch.float32):
    """This rank's part of the model: only its blocks are allocated and initialised."""
    from parallel.shard import materialize

    return materialize(build_model_on_meta(model_cfg, topo, recompute), device, seed, dtype)


class Layout:
    def __init__(self, spec: LayoutSpec, cfg, env: DistEnv, model_cfg, device, param_dtype: torch.dtype):
        from parallel import Topology, build_optimizer

        self.spec, self.env = spec, env
        self.seq_len = int(cfg.stage.seq_len)
        self.topo = Topology.from_config(cfg.parallel, model_cfg, seq_len=self.seq_len)
        self.model = build_model(model_cfg, self.topo, device, int(cfg.trainer.seed), bool(cfg.trainer.recompute),
                                 param_dtype)
        o = cfg.optim
        self.optimizer, self.grad_sync = build_optimizer(
            self.model, self.topo, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps),
            weight_decay=float(o.weight_decay), impl=o.impl)
        self.optimizer_impl = f"distributed-{self.optimizer.impl}"
        self.pipeline = None
        if self.topo.pp > 1:
            from parallel.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(self.model, self.topo, device, param_dtype)
        self.dp, self.dp_rank, self.dp_group = self.topo.dp, self.topo.dp_rank, self.topo.dp_group
        self._pending, self._async_group = None, None  # a background checkpoint save in flight

    def local_inputs(self, micro_batch: dict) -> dict:
        if self.topo.cp == 1:
            return micro_batch
        from parallel.zigzag import shard_batch

        return shard_batch(micro_batch, self.seq_len, self.topo.cp_rank, self.topo.cp)

    def forward_backward(self, micro_batches: list[dict], denom: int, aux_weight: float, autocast):
        """Forward and backward of a step's micro-batches (on the device). Returns this rank's loss sum and its
        MoE sums [routed, aux, dropped, tokens per layer and expert...] (zeros for other stages' layers)."""
        if self.pipeline is not None:
            with self.grad_sync.no_sync():  # the schedule interleaves micro-batches: sync after all of them
                loss_sum, moe, tokens_per_expert, routed = self.pipeline.forward_backward(
                    micro_batches, denom, aux_weight, autocast)
        else:
            cfg, device = self.model.cfg, micro_batches[0]["input_ids"].device
            loss_sum, moe = (torch.zeros(n, dtype=torch.float64, device=device) for n in (1, 2))
            tokens_per_expert = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.float64, device=device)
            routed = 0
            for i, mb in enumerate(micro_batches):
                remember_cu_seqlens(mb["cu_seqlens"], mb["cu_seqlens_host"])
                # only the last micro-batch's backward starts the gradient reduce-scatters
                with contextlib.nullcontext() if i == len(micro_batches) - 1 else self.grad_sync.no_sync():
                    with autocast:
                        out = self.model(mb["input_ids"], mb["cu_seqlens"], mb["labels"], positions=mb["positions"])
                    (out.loss_sum / denom + out.aux_loss * aux_weight).backward()
                loss_sum += out.loss_sum.detach().double()
                moe += torch.stack([torch.as_tensor(out.aux_loss).detach().double(),
                                    torch.as_tensor(out.moe_dropped, device=device).double()])
                tokens_per_expert += out.tokens_per_expert.detach().double()
                routed += out.moe_routed
        routed = torch.tensor([routed], dtype=torch.float64).to(loss_sum.device, non_blocking=True)
        return loss_sum, torch.cat([routed, moe, tokens_per_expert.reshape(-1)])

    def sync_and_clip(self, max_norm: float) -> float:
        self.grad_sync.finish()
        return self.grad_sync.clip_grad_norm_(max_norm)

    def _sum(self, values: torch.Tensor, group) -> torch.Tensor:
        if self.topo.world_size > 1:
            dist.all_reduce(values, group=group)
        return values

    def reduce_step_stats(self, dp_cp_stats: torch.Tensor, world_stats: torch.Tensor):
        """Loss sums over DP x CP (every TP rank holds its micro-batch's whole loss; CP ranks hold disjoint
        tokens) and over PP (only the last stage has it); MoE sums over all ranks (each rank reports its router
        group's or its own counts, for its stage's layers)."""
        loss = self._sum(dp_cp_stats, self.topo.dp_cp_group)
        if self.topo.pp > 1:
            loss = self._sum(loss, self.topo.pp_group)
        return loss, self._sum(world_stats, None)

    def save_checkpoint(self, root, step, extra, config_yaml, meta, keep_last, background: bool = False):
        """All ranks write their shards into rank 0's temp folder; rank 0 then completes it atomically. With
        `background` the write runs in a thread and `finish_checkpoint` completes it later."""
        from parallel.checkpoint import save_state, save_state_async

        self.finish_checkpoint(wait=True)
        tmp = ckpt.begin_save(root, step) if self.env.is_main else ckpt.temp_dir(root, step)
        barrier(self.env)
        if background:
            if self._async_group is None and self.env.distributed:  # a collective: every rank gets here together
                self._async_group = dist.new_group(backend="gloo")
            future = save_state_async(tmp, self.model, self.optimizer, extra, self.topo, self._async_group)
            self._pending = (future, root, step, tmp, config_yaml, meta, keep_last)
            return None
        try:
            save_state(tmp, self.model, self.optimizer, extra, self.topo)  # ends with a barrier
            path = self._complete(root, step, tmp, config_yaml, meta, keep_last)
        except (OSError, CheckpointException) as exc:
            raise self._write_failed(exc, tmp) from None
        barrier(self.env)
        return path

    def finish_checkpoint(self, wait: bool) -> None:
        """Complete a background save once its writes are done (`wait`: block until they are)."""
        if self._pending is None or not (wait or self._pending[0].done()):
            return
        future, *rest = self._pending
        self._pending = None
        try:
            future.result()  # rank 0's future ends after every rank's data and the metadata are written
            self._complete(*rest)  # rank 0 alone: no other rank waits for the rename
        except (OSError, CheckpointException) as exc:
            raise self._write_failed(exc, rest[2]) from None

    def _write_failed(self, exc: Exception, tmp) -> ConfigError:
        """A full or read-only disk: remove the partial folder and say where and how much (the previous
        checkpoint is untouched: nothing but the temporary folder was written)."""
        failures = getattr(exc, "failures", None)  # DCP: {rank: exception or (exception, traceback)}
        if failures:
            first = next(iter(failures.values()))
            exc = first[0] if isinstance(first, tuple) else first
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        owned = sum(master.numel() for _, master, _ in self.optimizer.slices())
        need = 12 * owned * self.env.world_size  # bytes: fp32 masters and two moments per owned element
        size = f"{need / 2 ** 30:.2f} GiB" if need >= 2 ** 30 else f"{need / 2 ** 20:.1f} MiB"
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        return ConfigError(f"checkpoint: cannot write {Path(tmp).parent}: {reason}; this run's checkpoints need "
                           f"about {size} each (trainer.run_dir)")

    def _complete(self, root, step, tmp, config_yaml, meta, keep_last):
        if not self.env.is_main:
            return None
        path = ckpt.finish_save(root, step, tmp, config_yaml, meta, keep_last)
        say(f"checkpoint: {path} ({self.spec.description})")
        return path

    def load_checkpoint(self, path) -> dict:
        from parallel.checkpoint import load_checkpoint

        # verify=False: trainer.train checked the files before anything was written
        return load_checkpoint(path, self.model, self.optimizer, self.topo, verify=False)
