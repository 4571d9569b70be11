"""Pipeline parallelism over decoder layers, on `torch.distributed.pipelining`'s stages and schedules.

The model's layers are cut into pp x virtual_stages contiguous stages (`parallel.pp_layers`, or the split that
balances a FLOP cost model: lightning and softmax layers at the window length, the LM head on the last stage).
Stage s lives on pipeline rank s % pp (`1f1b`, and `interleaved_1f1b` with virtual stages). `parallelize` keeps only this rank's layers (and the embedding on
the first stage, norm + head on the last) before anything is allocated, under their global names.

Per micro-batch, every stage needs the documents' boundaries and positions, and the last the labels: every
pipeline rank of a data-parallel replica reads the same windows, and the schedule hands each stage the
micro-batch's index (a one-element tensor, which pipelining chunks like any input; varying `cu_seqlens` could
not be chunked). The last stage returns the micro-batch's loss (`loss_sum / global label tokens + aux`); every
other stage attaches its layers' aux loss to its output, so the aux gradient is exact on every stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.cu_seqlens import remember_cu_seqlens

# torch's zero-bubble schedules (ScheduleInterleavedZeroBubble, ZBV, DualPipeV) compute weight gradients with
# torch.autograd.grad and assign them outside backward: they bypass the post-accumulate hooks through which
# GradSync collects every gradient into its fp32 buckets (and fail on parameters that are bucket views).
SCHEDULES = ("1f1b", "interleaved_1f1b")


@dataclass(frozen=True)
class PipelinePlan:
    schedule: str
    pp: int
    stage_layers: tuple  # per stage: its global layer indices

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    def local_stages(self, pp_rank: int) -> list[int]:
        return list(range(pp_rank, self.num_stages, self.pp))

    @property
    def virtual_stages(self) -> int:
        return self.num_stages // self.pp

    def in_flight(self, pp_rank: int, n: int) -> int:
        """Stage micro-batches whose activations rank `pp_rank` holds at once at the peak of a step of n
        micro-batches: 1F1B warms up with pp - 1 - rank forwards (Megatron's count, also for interleaving)."""
        v = self.virtual_stages
        if v == 1:
            return min(n, self.pp - pp_rank)
        return min(n * v, (self.pp - pp_rank - 1) * 2 + (v - 1) * self.pp + 1)

    def bubble_fraction(self, n: int) -> float:
        """Idle share of a step of n micro-batches per rank: (pp - 1) / (v * n + pp - 1)."""
        return (self.pp - 1) / (self.virtual_stages * n + self.pp - 1)

    def check_micro_batches(self, n: int) -> None:
        """One line when a step's micro-batches per rank cannot run this schedule."""
        if n < self.pp:
            raise ValueError(f"parallel.pp_schedule={self.schedule} needs at least parallel.pp={self.pp} "
                             f"micro-batches per rank and step; the batch schedule gives {n}")
        if self.schedule == "interleaved_1f1b" and n % self.pp:
            raise ValueError(f"parallel.pp_schedule=interleaved_1f1b needs micro-batches per rank ({n}) to be "
                             f"a multiple of parallel.pp={self.pp}")


def layer_costs(cfg, seq_len: int) -> tuple[list[float], float]:
    """Forward FLOPs per token of every layer, and of the LM head (the embedding is a lookup: no FLOPs)."""
    h, q, kv = cfg.hidden_size, cfg.q_dim, cfg.num_kv_heads * cfg.head_dim
    moe = 2 * (cfg.top_k * 3 * h * cfg.ffn_hidden_size + h * cfg.num_experts)
    lightning = 2 * 5 * h * q + 4 * cfg.num_heads * cfg.head_dim ** 2 + moe
    softmax = 2 * (2 * h * q + 2 * h * kv) + 2 * seq_len * cfg.num_heads * cfg.head_dim + moe
    return ([softmax if cfg.layer_is_softmax(i) else lightning for i in range(cfg.num_layers)],
            2.0 * h * cfg.vocab_size)


def balanced_split(costs: list[float], stages: int, last_extra: float) -> list[int]:
    """Layers per stage (contiguous, each >= 1) minimising the most expensive stage; the last adds the head."""
    L = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max cost of splitting the first i layers into s stages
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    cut = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, L - (stages - s) + 1):
            extra = last_extra if s == stages else 0.0
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    sizes, i = [], L
    for s in range(stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return sizes[::-1]


def plan_pipeline(model_cfg, pp: int, schedule: str = "1f1b", virtual_stages: int = 1, pp_layers=None,
                  seq_len: int = 4096) -> PipelinePlan:
    """The stages of `parallel.pp / pp_schedule / virtual_stages / pp_layers`; ValueError naming the setting."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r} must be one of {'|'.join(SCHEDULES)}")
    if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) or virtual_stages < 1:
        raise ValueError(f"parallel.virtual_stages={virtual_stages!r} must be a positive integer")
    if schedule == "1f1b" and virtual_stages != 1:
        raise ValueError(f"parallel.pp_schedule=1f1b runs one stage per rank: parallel.virtual_stages="
                         f"{virtual_stages} needs pp_schedule=interleaved_1f1b")
    stages, L = pp * virtual_stages, model_cfg.num_layers
    if pp_layers is not None:
        sizes = list(pp_layers)
        if len(sizes) != stages or any(not isinstance(n, int) or n < 1 for n in sizes) or sum(sizes) != L:
            raise ValueError(f"parallel.pp_layers={sizes} must list {stages} positive layer counts (pp x "
                             f"virtual_stages) summing to model.num_layers={L}")
    elif L < stages:
        raise ValueError(f"model.num_layers={L} does not split into parallel.pp x parallel.virtual_stages = "
                         f"{pp} x {virtual_stages} = {stages} stages of at least one layer")
    else:
        costs, head = layer_costs(model_cfg, seq_len)
        sizes = balanced_split(costs, stages, head)
    bounds = [sum(sizes[:s]) for s in range(stages + 1)]
    return PipelinePlan(schedule, pp, tuple(tuple(range(bounds[s], bounds[s + 1])) for s in range(stages)))


def keep_local_stages(model, plan: PipelinePlan, pp_rank: int) -> None:
    """Drop every layer of other ranks' stages, the embedding unless stage 0 is here, norm + head unless the last."""
    stages = plan.local_stages(pp_rank)
    mine = {str(i) for s in stages for i in plan.stage_layers[s]}
    for key in [k for k in model.layers if k not in mine]:
        del model.layers[key]
    if 0 not in stages:
        model.embed_tokens = None
    if plan.num_stages - 1 not in stages:
        model.norm = model.lm_head = None
    model.pipeline = plan


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the stage's output; its backward also sends gradient 1 into the stage's aux loss."""

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.aux_shape = aux_loss.shape
        return output

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_ones(ctx.aux_shape, dtype=torch.float32)


class PipelineChunk(nn.Module):
    """One stage: (embedding) -> its layers -> (norm, head, loss). Registers only its own modules (the model
    also holds them), so the stage's parameters are exactly this stage's."""

    def __init__(self, model, stage: int, runner: PipelineRunner):
        super().__init__()
        plan = model.pipeline
        self.first, self.last = stage == 0, stage == plan.num_stages - 1
        self.layer_ids = plan.stage_layers[stage]
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in self.layer_ids})
        self.embed_tokens = model.embed_tokens if self.first else None
        self.norm = model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self._model, self._runner = [model], runner  # in a list: not a submodule (its parameters are not ours)

    def forward(self, x, mb):
        runner, model = self._runner, self._model[0]
        i = int(mb)
        inputs = runner.inputs[i]
        remember_cu_seqlens(inputs["cu_seqlens"], inputs["cu_seqlens_host"])  # micro-batches interleave
        if self.first:
            x = self.embed_tokens(x[0])
        x = model.run_layers(x, inputs["cu_seqlens"], inputs["positions"], self.layers.values())
        aux = runner.record_moe_stats(self.layer_ids)
        if not self.last:
            return _AttachAuxLoss.apply(x, aux * runner.aux_weight)
        loss_sum = model.head_loss_sum(self.norm(x), inputs["labels"])
        runner.loss_sum += loss_sum.detach().double()
        return (loss_sum / runner.denom + aux * runner.aux_weight).reshape(1)


class PipelineRunner:
    """Runs one step's micro-batches through this rank's stages with the configured schedule."""

    def __init__(self, model, topo, device, dtype: torch.dtype):
        self.model, self.topo, self.device, self.dtype = model, topo, device, dtype
        self.plan: PipelinePlan = model.pipeline
        self.stage_ids = self.plan.local_stages(topo.pp_rank)
        self.chunks = [PipelineChunk(model, s, self) for s in self.stage_ids]
        self._stages, self._schedules = None, {}

    def _build_stages(self, tokens: int) -> None:
        from torch.distributed.pipelining import PipelineStage

        tp = self.topo.tp if self.topo.sequence_parallel else 1
        # activations carry gradients: their metadata must say so, or no gradient buffer is set up
        hidden = torch.empty(tokens // tp, self.model.cfg.hidden_size, dtype=self.dtype, device=self.device,
                             requires_grad=True)
        ids = torch.empty(1, tokens, dtype=torch.long, device=self.device)
        loss = torch.empty(1, dtype=torch.float32, device=self.device)  # [1]: merged over micro-batches by cat
        self._stages = [PipelineStage(chunk, s, self.plan.num_stages, self.device,
                                      input_args=ids if chunk.first else hidden,
                                      output_args=loss if chunk.last else hidden, group=self.topo.pp_group)
                        for chunk, s in zip(self.chunks, self.stage_ids)]

    def _schedule(self, n: int):
        if n not in self._schedules:
            from torch.distributed import pipelining

            self.plan.check_micro_batches(n)
            kind = {"1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}[self.plan.schedule]
            stages = self._stages[0] if self.plan.schedule == "1f1b" else self._stages
            self._schedules[n] = getattr(pipelining, kind)(stages, n, loss_fn=lambda out, target: out.sum(),
                                                          scale_grads=False)
        return self._schedules[n]

    def record_moe_stats(self, layer_ids) -> torch.Tensor:
        """Add the stage's MoE statistics of this micro-batch; returns its aux loss (the layers' sum)."""
        aux = 0.0
        for i in layer_ids:
            s = self.model.layers[str(i)].mlp.last_stats
            aux = aux + s["aux_loss"]
            self.moe[0] += s["aux_loss"].detach().double()
            self.moe[1] += torch.as_tensor(s["dropped"], device=self.device).double()
            self.tokens_per_expert[i] += s["tokens_per_expert"].detach().double()
            self.routed += int(s["routed"])
        return torch.as_tensor(aux, dtype=torch.float32, device=self.device)

    def forward_backward(self, micro_batches: list[dict], denom: int, aux_weight: float, autocast):
        """One step's forward and backward. Returns (loss_sum on the last stage else 0, [aux, dropped] sums of
        this rank's layers, tokens per expert [L, E] with zeros for other ranks' layers, routed count)."""
        cfg = self.model.cfg
        self.inputs, self.denom, self.aux_weight = micro_batches, denom, aux_weight
        self.loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.moe = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.tokens_per_expert = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.float64,
                                             device=self.device)
        self.routed = 0
        if self._stages is None:
            self._build_stages(micro_batches[0]["input_ids"].numel())
        n = len(micro_batches)
        schedule = self._schedule(n)
        ids = torch.stack([mb["input_ids"] for mb in micro_batches])
        args = (ids,) if any(c.first for c in self.chunks) else ()
        with autocast:
            schedule.step(*args, target=torch.zeros(n), losses=[], mb=torch.arange(n))
        self.inputs = None
        return self.loss_sum, self.moe, self.tokens_per_expert, self.routed
