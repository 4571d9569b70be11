"""Tensor parallelism with optional sequence parallelism (Megatron-style), device-agnostic.

Layout over the TP group (rank r of n):
- column-parallel projections keep output rows r*out/n .. (attention q/k/v split by heads, the LM head by
  vocabulary); row-parallel projections keep input columns (the attention output projections). The attention
  layers themselves are converted in `parallel.attention_parallel`, together with context parallelism;
- the embedding keeps vocabulary rows r*V/n ..; the chunked head + cross-entropy runs on the vocabulary shard;
- the lightning RMSNorm over all heads keeps this rank's channels and all-reduces its sum of squares;
- everything else (norms, router, experts) is replicated.

Regions: with sequence parallelism (SP) activations between attention blocks are split along tokens
([T/n, h] per rank) and enter a TP block by all-gather and leave it by reduce-scatter; without SP they are
replicated, enter by copy (backward all-reduce) and leave by all-reduce. Every TP rank computes the same loss.

Every parameter cut here gets its `ShardSpec` (`parallel.shard`), the only sharding record the rest reads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.moe import MoE, Routing, capacity_keep_mask, count_per_expert, expert_capacity
from model.norm import RMSNorm
from model.transformer import MiniMaxForCausalLM, ModelOutput

from .collectives import all_gather, all_reduce, copy_to_group, group_rank, group_size, reduce_scatter
from .global_router import group_aux_loss
from .shard import mark_partial_over_tp, shard_parameter
from .vocab_parallel_loss import vocab_parallel_linear_cross_entropy


# ---- regions ------------------------------------------------------------------------------------------------
def enter_tp_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Input of column-parallel projections: full tokens on every rank."""
    return all_gather(x, group, 0) if sequence_parallel else copy_to_group(x, group)


def exit_tp_region(y: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Output of row-parallel projections: sum the partial products (SP: and keep this rank's tokens)."""
    return reduce_scatter(y, group, 0) if sequence_parallel else all_reduce(y, group)


def scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated tokens -> this rank's contiguous 1/n; backward sums the (zero-padded) slices over TP."""
    n = group_size(group)
    return x if n == 1 else copy_to_group(x, group).chunk(n, dim=0)[group_rank(group)]


class _GatherReplicatedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        # The gathered output feeds a replicated region: its gradient is the same on every rank.
        return grad.chunk(group_size(ctx.group), dim=0)[group_rank(ctx.group)].contiguous(), None


def gather_from_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's tokens -> all tokens (replicated region follows); backward keeps this rank's slice."""
    return x if group_size(group) == 1 else _GatherReplicatedGrad.apply(x, group)


# ---- sharding helpers ---------------------------------------------------------------------------------------
def _shard_param(module: nn.Module, name: str, dim: int, group) -> nn.Parameter:
    return shard_parameter(module, name, [(dim, "tp", group_size(group), group_rank(group))])


def shard_column_parallel(linear: nn.Linear, group) -> nn.Linear:
    """Keep output rows r*out/n .. (requires the output dim to be head-major / vocab-contiguous)."""
    _shard_param(linear, "weight", 0, group)
    linear.out_features = linear.weight.shape[0]
    return linear


def shard_row_parallel(linear: nn.Linear, group) -> nn.Linear:
    _shard_param(linear, "weight", 1, group)
    linear.in_features = linear.weight.shape[1]
    return linear


# ---- embedding and loss -------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """Rows vocab_start .. vocab_start + V/n of the table; ids outside contribute zeros, summed over TP."""

    @classmethod
    def convert(cls, emb: nn.Embedding, group, sequence_parallel: bool) -> VocabParallelEmbedding:
        emb.__class__ = cls
        emb.tp_group, emb.sequence_parallel = group, sequence_parallel
        emb.vocab_start = group_rank(group) * emb.num_embeddings // group_size(group)
        _shard_param(emb, "weight", 0, group)
        emb.num_embeddings = emb.weight.shape[0]
        return emb

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0.0)
        return exit_tp_region(out, self.tp_group, self.sequence_parallel)


# ---- the lightning norm over split heads (used by parallel.attention_parallel) -----------------------------
class TensorParallelRMSNorm(RMSNorm):
    """RMSNorm over a dimension split across TP: this rank's channels, statistics over all of them."""

    @classmethod
    def convert(cls, norm: RMSNorm, group) -> TensorParallelRMSNorm:
        norm.__class__ = cls
        norm.tp_group, norm.full_dim = group, norm.weight.shape[0]
        _shard_param(norm, "weight", 0, group)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        # Forward: sum over ranks. Backward: each rank's loss reaches the statistic only through its own
        # channels, so the statistic's gradient is summed over ranks too (copy_to_group).
        sumsq = all_reduce(copy_to_group(x32.pow(2).sum(-1, keepdim=True), self.tp_group), self.tp_group)
        x32 = x32 * torch.rsqrt(sumsq / self.full_dim + self.eps)
        return self.weight * x32.to(dtype)


# ---- MoE with replicated experts (ep = etp = 1) ------------------------------------------------------------
class TensorParallelMoE(MoE):
    """Each TP rank routes its contiguous 1/n of the tokens (without SP: scattered in, gathered out), so expert
    and router gradients are partial sums over TP (the router is marked partial over TP; experts sync over
    EDP, which contains TP). Capacity and aux loss are those of the whole token group, i.e. exactly the
    single-process values: the group's routing is all-gathered, the global keep mask computed, and each rank
    keeps its part of it (a prefix of its own gate order, so the local capacity rule reproduces it).
    `token_group`: the ranks sharing one micro-batch (TP, or TP x CP under context parallelism)."""

    @classmethod
    def convert(cls, moe: MoE, tp_group, sequence_parallel: bool, token_group=None) -> TensorParallelMoE:
        moe.__class__ = cls
        moe.tp_group, moe.sequence_parallel = tp_group, sequence_parallel
        moe.token_group = tp_group if token_group is None else token_group
        mark_partial_over_tp(moe.gate.weight)
        moe._group_dropped = moe._group_counts = None
        return moe

    def capacity(self, routing: Routing, num_tokens: int):
        if self.capacity_factor is None:
            return None
        g, n = self.token_group, group_size(self.token_group)
        with torch.no_grad():
            expert_idx, gates = all_gather(routing.expert_idx, g), all_gather(routing.gates.detach(), g)
        c = expert_capacity(num_tokens * n, self.top_k, self.num_experts, self.capacity_factor)
        keep = capacity_keep_mask(expert_idx, gates, torch.full((self.num_experts,), c, device=gates.device))
        self._group_dropped = (~keep).sum()
        mine = keep.chunk(n)[group_rank(g)]
        return count_per_expert(routing.expert_idx, self.num_experts, where=mine)

    def aux_loss(self, routing: Routing, num_tokens: int):
        g, n = self.token_group, group_size(self.token_group)
        counts = routing.tokens_per_expert.clone()
        if n > 1:
            dist.all_reduce(counts, group=g)
        self._group_counts = counts
        return group_aux_loss(routing.probs, counts, num_tokens * n, self.top_k, self.aux_loss_coef, (g,), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            x = scatter_to_sequence_region(x, self.tp_group)
        y = super().forward(x)
        n = group_size(self.token_group)
        dropped = self._group_dropped if self._group_dropped is not None else self.last_stats["dropped"]
        self.last_stats.update(routed=self.last_stats["routed"] * n, dropped=dropped,
                               tokens_per_expert=self._group_counts)
        self._group_dropped = self._group_counts = None
        if not self.sequence_parallel:
            y = gather_from_sequence_region(y, self.tp_group)
        return y


# ---- LM head and the model's loss ---------------------------------------------------------------------------
class ColumnParallelLinear(nn.Linear):
    """Output rows r*out/n ..; the input enters the TP region first (all-gather with SP, copy without)."""

    @classmethod
    def convert(cls, linear: nn.Linear, group, sequence_parallel: bool, shard: bool = True):
        linear.__class__ = cls
        linear.tp_group, linear.sequence_parallel = group, sequence_parallel
        if shard:
            shard_column_parallel(linear, group)
        return linear

    def forward(self, x):
        return F.linear(enter_tp_region(x, self.tp_group, self.sequence_parallel), self.weight, self.bias)


class TensorParallelCausalLM(MiniMaxForCausalLM):
    """Vocab-parallel embedding, LM head and cross-entropy; loss_sum is the micro-batch's on every TP rank."""

    @classmethod
    def convert(cls, model: MiniMaxForCausalLM, group, sequence_parallel: bool):
        model.__class__ = cls
        model.tp_group = group
        # vocabulary rows of this rank (a pipeline stage may hold neither the embedding nor the head)
        model.vocab_start = group_rank(group) * model.cfg.vocab_size // group_size(group)
        if model.embed_tokens is not None:
            VocabParallelEmbedding.convert(model.embed_tokens, group, sequence_parallel)
        tied = model.cfg.tie_embeddings
        if model.lm_head is not None:
            ColumnParallelLinear.convert(model.lm_head, group, sequence_parallel, shard=not tied)
            if tied:
                model.lm_head.weight = model.embed_tokens.weight
                model.lm_head.out_features = model.lm_head.weight.shape[0]
        return model

    def forward(self, input_ids, cu_seqlens, labels=None, positions=None) -> ModelOutput:
        out = super().forward(input_ids, cu_seqlens, labels, positions)  # out.logits: [T, V/n] of this rank
        if labels is None:
            with torch.no_grad():
                out.logits = all_gather(out.logits, self.tp_group, dim=-1)
        return out

    def head_loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = enter_tp_region(h, self.tp_group, self.lm_head.sequence_parallel)  # backward sums over TP
        return vocab_parallel_linear_cross_entropy(h, self.lm_head.weight, labels, self.tp_group, self.vocab_start)
