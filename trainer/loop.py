"""The training loop: gradient accumulation over micro-batches, the optimizer step, metrics and checkpoints."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import RankStreams, StepPrefetcher
from kernels.cu_seqlens import remember_cu_seqlens
from model.rope import positions_from_cu_seqlens

from .checkpoint import step_dir_name
from .config import ConfigError
from .distributed import DistEnv
from .logger import say
from .metrics import peak_memory_gib, throughput
from .optim import set_lr
from .preemption import StopRequests
from .schedules import BatchSchedule, LRSchedule


def expert_load_shares(tokens_per_expert: torch.Tensor) -> dict:
    """Per-expert load of the step: each expert's share of its layer's routed assignments (1/E is balanced).

    `tokens_per_expert` [L, E] is summed over micro-batches and ranks; every rank counts its own tokens or its
    router group's (then each group is counted by all its ranks alike), so the shares are exact for every layout.
    """
    shares = tokens_per_expert / tokens_per_expert.sum(-1, keepdim=True).clamp(min=1)
    low, high, mean = torch.stack([shares.min(), shares.max(), shares.mean()]).tolist()
    return {"moe/load_share_min": low, "moe/load_share_max": high, "moe/load_share_mean": mean}


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm of a step is NaN/inf; raised before the optimizer step."""


class Preempted(RuntimeError):
    """A stop signal arrived; the step it arrived in was finished and checkpointed."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # global tokens consumed by those steps


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """The loop over optimizer steps; `layout` (trainer.layout) owns the model, optimizer and communication.

    `stream` is the run's `data.DataSource`: this DP rank reads its sub-streams of it (`data.substreams`) in a
    background thread, two steps ahead (`data.prefetch`); `run` stops the thread when it ends.
    """

    def __init__(self, *, cfg, env: DistEnv, device: torch.device, autocast_dtype: torch.dtype | None, layout,
                 stream, collate, lr_schedule: LRSchedule, batch_schedule: BatchSchedule, logger,
                 flops_per_token: float, peak_tflops: float, ckpt_root: Path, config_yaml: str):
        self.cfg, self.env, self.device, self.autocast_dtype = cfg, env, device, autocast_dtype
        self.layout, self.model, self.optimizer = layout, layout.model, layout.optimizer
        self.data = StepPrefetcher(RankStreams(stream, layout.dp, layout.dp_rank, layout.dp_group))
        self.collate = collate
        self.lr_schedule, self.batch_schedule, self.logger = lr_schedule, batch_schedule, logger
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.ckpt_root, self.config_yaml = Path(ckpt_root), config_yaml
        self.seq_len = int(cfg.stage.seq_len)
        self.micro_batch_size = int(cfg.trainer.micro_batch_size)
        self.grad_clip = float(cfg.optim.grad_clip or 0.0)
        self.state = TrainState()
        self.saved_step: int | None = None  # step of the newest checkpoint on disk (set by resume and save)

    # ---- checkpoint state -------------------------------------------------------------------------------
    def training_state(self) -> dict:
        """Everything of a checkpoint except the model and optimizer (those are the layout's)."""
        return {
            "scheduler": {"step": self.state.step, "tokens_seen": self.state.tokens_seen,
                          "lr": self.optimizer.param_groups[0]["lr"]},
            "data": self.data.state_dict(),  # every sub-stream's position, gathered over the DP group
            "rng": rng_state(),
            "trainer": {"step": self.state.step, "tokens_seen": self.state.tokens_seen},
        }

    def load(self, path: Path) -> None:
        """Resume from checkpoint folder `path`, written under this or any other layout."""
        state = self.layout.load_checkpoint(path)
        self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.state = TrainState(**state["trainer"])
        self.saved_step = self.state.step

    def save(self) -> None:
        meta = {"tokens_seen": self.state.tokens_seen, "world_size": self.env.world_size,
                "layout": self.layout.spec.description}
        self.layout.save_checkpoint(self.ckpt_root, self.state.step, self.training_state(), self.config_yaml, meta,
                                    int(self.cfg.trainer.checkpoint.keep_last),
                                    background=bool(self.cfg.trainer.checkpoint.get("async")))
        self.saved_step = self.state.step

    # ---- one optimizer step -----------------------------------------------------------------------------
    def _global_windows_per_step(self, tokens_seen: int):
        """The global batch's window count of every step from the one after `tokens_seen` tokens on."""
        while True:
            batch = self.batch_schedule.global_batch_tokens(tokens_seen)
            yield batch // self.seq_len
            tokens_seen += batch

    def _sum_over_replicas(self, values: list[int]) -> list[int]:
        """Sums over the DP replicas (TP/CP ranks of a replica read the same windows, so each counts its own)."""
        if self.layout.dp == 1:
            return values
        total = torch.tensor(values, dtype=torch.int64, device=self.device)  # NCCL needs a device tensor
        dist.all_reduce(total, group=self.layout.dp_group)
        return total.tolist()

    def _raise_data_failure(self, error: Exception | None):
        """Every DP rank raises when one failed to read its windows (else the others would wait for it in the
        next collective); a data setting error comes out as the same one-line ConfigError on every rank."""
        report = None if error is None else (isinstance(error, ConfigError), " ".join(str(error).split()))
        reports = [report] * self.layout.dp
        if self.layout.dp > 1:
            dist.all_gather_object(reports, report, group=self.layout.dp_group)
        is_setting, message = next(r for r in reports if r is not None)
        if is_setting:
            raise ConfigError(message) from None
        if error is not None:
            raise error
        raise RuntimeError(f"data: data-parallel rank {reports.index((is_setting, message))} could not read its "
                           f"windows: {message}")

    def _next_micro_batches(self, micro_per_rank: int) -> tuple[list[dict], int]:
        """This replica's micro-batches of the step, and the label tokens of the whole global batch.

        Window g of the run comes from sub-stream g % data.streams and goes to DP rank g % dp (all TP/CP ranks
        of a replica read the same windows), so the global batch and the saved data position do not depend on
        the layout, and a rank reads only its own windows."""
        if not self.data.running:
            self.data.start(self._global_windows_per_step(self.state.tokens_seen))
        per_rank = micro_per_rank * self.micro_batch_size
        try:
            mine, error = self.data.next_step(), None
            if len(mine) != per_rank:
                raise RuntimeError(f"data: read {len(mine)} windows for this rank's step, it needs {per_rank}")
        except Exception as exc:  # noqa: BLE001 -- every rank learns of it below
            mine, error = [], exc
        micro_batches = [self.collate(mine[i:i + self.micro_batch_size])
                         for i in range(0, len(mine), self.micro_batch_size)]
        label_tokens, failed = self._sum_over_replicas([sum(mb["num_tokens"] for mb in micro_batches),
                                                        error is not None])
        if failed:
            self._raise_data_failure(error)
        return micro_batches, label_tokens

    def _device_inputs(self, mb: dict) -> dict:
        """A micro-batch on the device, with the documents' positions (a pipeline stage needs them)."""
        cu_seqlens = mb["cu_seqlens"].to(self.device, non_blocking=True)
        remember_cu_seqlens(cu_seqlens, mb["cu_seqlens"])  # the layers read it without a device sync
        input_ids = mb["input_ids"].to(self.device, non_blocking=True)
        positions = mb.get("positions")
        positions = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0]) if positions is None \
            else positions.to(self.device, non_blocking=True)
        return {"input_ids": input_ids, "labels": mb["labels"].to(self.device, non_blocking=True),
                "cu_seqlens": cu_seqlens, "cu_seqlens_host": mb["cu_seqlens"], "positions": positions}

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        step = self.state.step + 1
        dp, world = self.layout.dp, self.env.world_size
        global_batch = self.batch_schedule.global_batch_tokens(self.state.tokens_seen)
        micro_per_rank = self.batch_schedule.micro_batches_per_rank(
            self.state.tokens_seen, self.micro_batch_size, self.seq_len, dp)
        micro_batches, label_tokens = self._next_micro_batches(micro_per_rank)
        lr = self.lr_schedule(step, self.state.tokens_seen)
        set_lr(self.optimizer, lr)

        # Normalise by the label tokens of the whole global batch, so that accumulation and data parallelism
        # give the same gradient as one big batch (documents end at EOS, so counts differ per micro-batch).
        denom = max(label_tokens, 1)
        # The aux loss is the mean over router groups and micro-batches (convention: parallel/moe_parallel.py);
        # the layers scale their gradients so that this weight is right for every layout.
        aux_weight = 1.0 / (micro_per_rank * dp)

        self.model.train()
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                  enabled=self.autocast_dtype is not None)
        inputs = [self._device_inputs(self.layout.local_inputs(mb)) for mb in micro_batches]
        loss_sum, moe = self.layout.forward_backward(inputs, denom, aux_weight, autocast)
        # Finish the gradient sync first (overlapped all-reduces may be in flight on the same communicators),
        # then reduce the step's statistics and judge them; no rank steps on a non-finite value.
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = self.layout.sync_and_clip(max_norm)
        loss_sum, moe = self.layout.reduce_step_stats(loss_sum, moe)
        loss_value = loss_sum.item() / denom
        (routed, aux_sum, dropped), tokens_per_expert = moe[:3].tolist(), moe[3:].view(self.model.cfg.num_layers, -1)
        # every rank holds its router group's aux value of its stage's layers: the mean over the ranks of one
        # pipeline stage, summed over the stages, is the step's aux loss
        aux_value = aux_sum / (micro_per_rank * world / self.layout.topo.pp)
        if not math.isfinite(loss_value) or not math.isfinite(aux_value):
            raise NonFiniteLoss(f"non-finite loss at step {step} (loss={loss_value}, aux_loss={aux_value}); "
                                f"stopped before the optimizer step, no checkpoint written")
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"non-finite gradient norm at step {step} (loss={loss_value}); "
                                f"stopped before the optimizer step, no checkpoint written")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0

        self.state = TrainState(step, self.state.tokens_seen + global_batch)
        return {
            "step": step,
            "tokens": self.state.tokens_seen,
            "loss": loss_value,
            "aux_loss": aux_value,
            "drop_rate": dropped / routed if routed else 0.0,
            **expert_load_shares(tokens_per_expert),
            "grad_norm": grad_norm,
            "lr": lr,
            "global_batch_tokens": global_batch,
            "micro_batches": micro_per_rank * dp,
            "label_tokens": label_tokens,
            "step_time_s": seconds,
            **throughput(global_batch, seconds, self.flops_per_token, world, self.peak_tflops),
            "memory_gib": peak_memory_gib(self.device),
        }

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self) -> None:
        total = int(self.cfg.trainer.steps)
        every = int(self.cfg.trainer.checkpoint.every)
        if self.state.step >= total and self.env.is_main:
            say(f"nothing to do: the run is at step {self.state.step} and trainer.steps={total}")
        stop_requests = StopRequests().install()
        try:
            while self.state.step < total:
                metrics = self.train_step()
                self.logger.log_step(metrics)
                self.layout.finish_checkpoint(wait=False)  # a background save whose writes are done
                if every and self.state.step % every == 0:
                    self.save()
                stop = stop_requests.agreed(self.device, self.env.distributed)
                if stop:
                    if self.saved_step != self.state.step:
                        self.save()
                    self.layout.finish_checkpoint(wait=True)
                    raise Preempted(f"stopped by {stop} after step {self.state.step}; checkpoint "
                                    f"{self.ckpt_root / step_dir_name(self.state.step)} (trainer.resume=auto "
                                    f"continues)")
            if self.cfg.trainer.checkpoint.at_end and self.saved_step != self.state.step:
                self.save()
            self.layout.finish_checkpoint(wait=True)
        finally:
            stop_requests.uninstall()
            self.data.stop()
