"""The training loop: gradient accumulation over micro-batches, the optimizer step, metrics and checkpoints."""

from __future__ import annotations

import dataclasses
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
from .profiling import StepProfiler
from .schedules import LOSS_SWITCH_DELAY, BatchSchedule, LRSchedule
from .watchdog import StepWatchdog


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
    skipped: int = 0  # steps whose update trainer.on_nonfinite=skip dropped


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
    background thread, two steps ahead (`data.prefetch`); `run` stops the thread when it ends. `mixture`
    (`data.MixtureTransition`, when the data is a mixture) gives each step's weights; `eval_source` (a
    `data.DataSource`, when eval.every > 0) the validation windows.
    """

    def __init__(self, *, cfg, env: DistEnv, device: torch.device, autocast_dtype: torch.dtype | None, layout,
                 stream, collate, lr_schedule: LRSchedule, batch_schedule: BatchSchedule, logger,
                 flops_per_token: float, peak_tflops: float, ckpt_root: Path, config_yaml: str, mixture=None,
                 eval_source=None):
        self.cfg, self.env, self.device, self.autocast_dtype = cfg, env, device, autocast_dtype
        self.layout, self.model, self.optimizer = layout, layout.model, layout.optimizer
        # a loss-triggered batch size reaches the first step the reader has not planned yet (schedules.py)
        self.data = StepPrefetcher(RankStreams(stream, layout.dp, layout.dp_rank, layout.dp_group),
                                   depth=LOSS_SWITCH_DELAY)
        self.mixture = mixture
        # built once (a held-out slice's document order is computed over the whole corpus), rewound at each use
        self.eval_stream = None if eval_source is None else eval_source.stream(0)
        self.eval_start = None if eval_source is None else self.eval_stream.state_dict()
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
            "batch": self.batch_schedule.state_dict(),  # the smoothed loss and the loss-triggered switches
            "data": self.data.state_dict(),  # every sub-stream's position, gathered over the DP group
            "rng": rng_state(),
            "trainer": dataclasses.asdict(self.state),
        }

    def load(self, path: Path) -> None:
        """Resume from checkpoint folder `path`, written under this or any other layout."""
        state = self.layout.load_checkpoint(path)
        self.data.load_state_dict(state["data"])
        if "batch" in state:  # checkpoints from before loss-triggered batch sizes lack it
            self.batch_schedule.load_state_dict(state["batch"])
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
    def _planned_steps(self, step: int, tokens_seen: int):
        """The reader's plan of every step after `step` (which ended with `tokens_seen` tokens): the global
        window count, with the mixture's weights when there is a mixture. The reader thread takes each plan as
        late as its read-ahead allows (data.prefetch), so a loss-triggered switch decided by then is in it."""
        while True:
            step += 1
            batch = self.batch_schedule.global_batch_tokens(tokens_seen, step)
            windows = batch // self.seq_len
            yield windows if self.mixture is None else (windows, self.mixture.weights(tokens_seen))
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
            self.data.start(self._planned_steps(self.state.step, self.state.tokens_seen))
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
        # the layers read it without a device sync; a step's micro-batches prime it again where each one runs
        remember_cu_seqlens(cu_seqlens, mb["cu_seqlens"])
        input_ids = mb["input_ids"].to(self.device, non_blocking=True)
        positions = mb.get("positions")
        positions = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0]) if positions is None \
            else positions.to(self.device, non_blocking=True)
        return {"input_ids": input_ids, "labels": mb["labels"].to(self.device, non_blocking=True),
                "cu_seqlens": cu_seqlens, "cu_seqlens_host": mb["cu_seqlens"], "positions": positions}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        step, tokens_before = self.state.step + 1, self.state.tokens_seen
        dp, world = self.layout.dp, self.env.world_size
        global_batch = self.batch_schedule.global_batch_tokens(tokens_before, step)
        micro_per_rank = self.batch_schedule.micro_batches_per_rank(
            tokens_before, self.micro_batch_size, self.seq_len, dp, step)
        micro_batches, label_tokens = self._next_micro_batches(micro_per_rank)
        lr = self.lr_schedule(step, tokens_before)
        set_lr(self.optimizer, lr)

        # Normalise by the label tokens of the whole global batch, so that accumulation and data parallelism
        # give the same gradient as one big batch (documents end at EOS, so counts differ per micro-batch).
        denom = max(label_tokens, 1)
        # The aux loss is the mean over router groups and micro-batches (convention: parallel/moe_parallel.py);
        # the layers scale their gradients so that this weight is right for every layout.
        aux_weight = 1.0 / (micro_per_rank * dp)

        self.model.train()
        inputs = [self._device_inputs(self.layout.local_inputs(mb)) for mb in micro_batches]
        loss_sum, moe = self.layout.forward_backward(inputs, denom, aux_weight, self._autocast())
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
        problem = self._non_finite(step, loss_value, aux_value, grad_norm)  # the same on every rank: reduced
        if problem and self.cfg.trainer.on_nonfinite == "stop":
            raise NonFiniteLoss(f"{problem}; stopped before the optimizer step, no checkpoint written")
        skipped = self.state.skipped + bool(problem)
        if problem:  # on_nonfinite=skip: this step's windows are consumed, its update dropped
            if self.env.is_main:
                say(f"{problem}: update skipped (trainer.on_nonfinite=skip; {skipped} so far)")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0

        self.state = TrainState(step, tokens_before + global_batch, skipped)
        # before the next step's windows are taken from the reader, so that the switch reaches its planned step
        switch = self.batch_schedule.observe_loss(step, tokens_before, loss_value)
        batch_keys = {"batch/loss_ema": self.batch_schedule.loss_ema} if self.batch_schedule.has_loss_entries else {}
        if switch is not None:
            entry, first_step = switch
            batch_keys["batch/switch_step"] = first_step
            if self.env.is_main:
                say(f"batch: smoothed loss {self.batch_schedule.loss_ema:.4f} < schedule.batch[{entry}].loss_below="
                    f"{self.batch_schedule.entries[entry][0].value} after step {step}: global batch {global_batch} -> "
                    f"{self.batch_schedule.entries[entry][1]} tokens from step {first_step}")
        weights = {} if self.mixture is None else {
            f"data/weight/{name}": w for name, w in self.mixture.weights(tokens_before).items()}
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
            "skipped_steps": skipped,
            **self._straggler_times(seconds),
            **throughput(global_batch, seconds, self.flops_per_token, world, self.peak_tflops),
            "memory_gib": peak_memory_gib(self.device),
            **batch_keys,
            **weights,
        }

    @staticmethod
    def _non_finite(step: int, loss: float, aux: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss) or not math.isfinite(aux):
            return f"non-finite loss at step {step} (loss={loss}, aux_loss={aux})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm at step {step} (loss={loss})"
        return None

    def _straggler_times(self, seconds: float) -> dict:
        """The step's time on every rank (median, max and which rank), so that a straggler shows."""
        if not self.env.distributed:
            return {}
        times = torch.zeros(self.env.world_size, dtype=torch.float64, device=self.device)
        times[self.env.rank] = seconds
        dist.all_reduce(times)
        return {"step_time_median_s": float(times.median()), "step_time_max_s": float(times.max()),
                "step_time_slowest_rank": int(times.argmax())}

    # ---- validation -------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """val/loss (nats per label token) and val/ppl over the first eval.windows windows of the validation
        stream, read from its start each time (the same windows at every evaluation). Window j is evaluated by DP
        rank j % dp, in micro-batches of trainer.micro_batch_size; the sums go over DP x CP like the training
        loss, so the value does not depend on the layout. The training stream and RNG are not touched."""
        dp, topo = self.layout.dp, self.layout.topo
        self.eval_stream.load_state_dict(self.eval_start)
        windows = [self.eval_stream.next_window() for _ in range(int(self.cfg.eval.windows))]  # every rank: all
        mine = windows[self.layout.dp_rank::dp]
        loss_sum, label_tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(mine), self.micro_batch_size):
                mb = self.collate(mine[i:i + self.micro_batch_size])
                x = self._device_inputs(self.layout.local_inputs(mb))
                with self._autocast():
                    out = self.model(x["input_ids"], x["cu_seqlens"], x["labels"], positions=x["positions"])
                loss_sum += out.loss_sum.double()
                label_tokens += mb["num_tokens"]
        totals = torch.stack([loss_sum, torch.tensor(float(label_tokens), dtype=torch.float64, device=self.device)])
        if self.env.world_size > 1:
            dist.all_reduce(totals, group=topo.dp_cp_group)
        loss_sum, label_tokens = totals.tolist()
        loss = loss_sum / max(label_tokens / topo.cp, 1.0)  # every CP rank of a replica counted the same labels
        return {"val/loss": loss, "val/ppl": math.exp(loss)}

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self) -> None:
        total = int(self.cfg.trainer.steps)
        every = int(self.cfg.trainer.checkpoint.every)
        eval_every = int(self.cfg.eval.every)
        if self.state.step >= total and self.env.is_main:
            say(f"nothing to do: the run is at step {self.state.step} and trainer.steps={total}")
        stop_requests = StopRequests().install()
        watchdog = StepWatchdog(float(self.cfg.trainer.step_timeout_s), self.env.rank, self.env.world_size).start()
        profiler = StepProfiler(self.cfg.trainer.profile.steps, self.ckpt_root.parent, self.env.rank, self.device)
        try:
            while self.state.step < total:
                profiler.before_step(self.state.step + 1)
                metrics = self.train_step()
                profiler.after_step(self.state.step)
                if eval_every and self.state.step % eval_every == 0:
                    metrics.update(self.evaluate())
                    if self.env.is_main:
                        say(f"step {self.state.step:>6} | val/loss {metrics['val/loss']:.4f} "
                            f"| val/ppl {metrics['val/ppl']:.2f}")
                self.logger.log_step(metrics)
                self.layout.finish_checkpoint(wait=False)  # a background save whose writes are done
                if every and self.state.step % every == 0:
                    self.save()
                watchdog.beat(self.state.step)
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
            profiler.stop()
            watchdog.stop()
            stop_requests.uninstall()
            self.data.stop()
