"""Mixture-of-Experts feed-forward: fp32 top-k router, capacity-based token drop, Switch aux loss, SwiGLU experts.

Routing: top-k by logit, gates = softmax over the chosen logits (Mixtral's softmax-topk-renormalise).
Token drop: expert e keeps at most capacity[e] of its assignments, highest gate first (ties: earlier token);
a dropped assignment contributes zero, the residual path still carries the token.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


@dataclass
class Routing:
    probs: torch.Tensor  # [T, E] fp32 full softmax (for the aux loss)
    expert_idx: torch.Tensor  # [T, k] chosen experts
    gates: torch.Tensor  # [T, k] fp32 combine weights
    tokens_per_expert: torch.Tensor  # [E] demand before dropping


def count_per_expert(expert_idx: torch.Tensor, num_experts: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """[num_experts] int64 counts of the indices (only those `where` is true). Unlike torch.bincount on CUDA,
    no device-to-host sync."""
    flat = expert_idx.flatten()
    ones = torch.ones_like(flat) if where is None else where.flatten().long()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, ones)


def route_top_k(logits: torch.Tensor, top_k: int) -> Routing:
    probs = logits.softmax(dim=-1)
    top_logits, expert_idx = logits.topk(top_k, dim=-1)
    gates = top_logits.softmax(dim=-1)
    counts = count_per_expert(expert_idx, logits.shape[-1])
    return Routing(probs, expert_idx, gates, counts)


def capacity_keep_mask(expert_idx: torch.Tensor, gates: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """[T, k] bool: for every expert e keep its capacity[e] highest-gate assignments, drop the rest."""
    E = capacity.numel()
    flat_expert, flat_gate = expert_idx.flatten(), gates.detach().flatten()
    # Order assignments by (expert, gate descending, token order); stable sorts keep earlier tokens first on ties.
    by_gate = torch.sort(flat_gate, descending=True, stable=True).indices
    order = by_gate[torch.sort(flat_expert[by_gate], stable=True).indices]
    counts = count_per_expert(flat_expert, E)
    group_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - group_start[flat_expert[order]]
    keep = torch.empty_like(flat_expert, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity.to(rank_in_expert.device)[flat_expert[order]]
    return keep.view_as(expert_idx)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def switch_aux_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, num_tokens: int, top_k: int,
                    coef: float) -> torch.Tensor:
    """coef * E * sum_i f_i * P_i with f_i = share of routed assignments, P_i = mean router probability."""
    E = probs.shape[-1]
    f = tokens_per_expert.float() / (num_tokens * top_k)
    P = probs.sum(0) / num_tokens
    return coef * E * torch.sum(f.detach() * P)


class TopKRouter(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Router logits in fp32 even under autocast: top-k decisions are sensitive to rounding.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))


# F.grouped_mm is public from torch 2.10; torch._grouped_mm is the same op in older releases.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_applies(x: torch.Tensor) -> bool:
    """Grouped products run on CUDA in bf16/fp16 (torch's op has no CPU backward and no fp32 kernel)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _grouped_mm is not None


def swiglu_products(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, w_gate, w_up, w_down,
                    grouped: bool | None = None) -> torch.Tensor:
    """Every expert's SwiGLU FFN on its rows of x_sorted [M, in] (grouped by expert, in order; counts sum to M).

    grouped=None picks grouped products where they apply, else a per-expert loop. With no rows the result still
    depends on x and the weights, so an expert-parallel rank's backward (and its collectives) runs like its peers'.
    """
    if grouped is None:
        grouped = grouped_mm_applies(x_sorted)
    if grouped:
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        h = F.silu(_grouped_mm(x_sorted, w_gate, offs=offs)) * _grouped_mm(x_sorted, w_up, offs=offs)
        return _grouped_mm(h, w_down, offs=offs)
    # unbind, not w[e]: indexing's backward would write a full-size zero gradient per expert.
    outs = [(F.silu(c @ g) * (c @ u)) @ d
            for c, g, u, d in zip(x_sorted.split(tokens_per_expert.tolist()), w_gate.unbind(), w_up.unbind(),
                                  w_down.unbind()) if c.shape[0]]
    if outs:
        return torch.cat(outs)
    anchor = x_sorted.sum() + w_gate.sum() + w_up.sum() + w_down.sum()
    return x_sorted.new_zeros(0, w_down.shape[-1]) + 0 * anchor


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFNs stored as stacked [E, in, out] weights so grouped matrix products can run them at once."""

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden))

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, hidden], rows grouped by expert in order; tokens_per_expert [E] sums to M."""
        # Under autocast the residual stream stays fp32; compute the experts in the autocast dtype, as nn.Linear would.
        dev = x_sorted.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_sorted.dtype
        return swiglu_products(x_sorted.to(dtype), tokens_per_expert,
                               *(w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down)))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor, self.aux_loss_coef = cfg.capacity_factor, cfg.aux_loss_coef
        self.gate = TopKRouter(cfg)
        self.experts = SwiGLUExperts(cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size)
        self.last_stats: dict = {}

    def capacity(self, routing: Routing, num_tokens: int) -> torch.Tensor | None:
        """Per-expert capacity [E] or None for no drop; parallel/ overrides this with the global router."""
        if self.capacity_factor is None:
            return None
        c = expert_capacity(num_tokens, self.top_k, self.num_experts, self.capacity_factor)
        return torch.full((self.num_experts,), c, dtype=torch.long, device=routing.expert_idx.device)

    def aux_loss(self, routing: Routing, num_tokens: int) -> torch.Tensor:
        return switch_aux_loss(routing.probs, routing.tokens_per_expert, num_tokens, self.top_k, self.aux_loss_coef)

    def experts_forward(self, x: torch.Tensor, token_idx, expert_idx, gates) -> torch.Tensor:
        """Run the kept assignments through their experts and sum them per token; parallel/ swaps in EP."""
        order = torch.sort(expert_idx, stable=True).indices
        token_idx, expert_idx, gates = token_idx[order], expert_idx[order], gates[order]
        counts = count_per_expert(expert_idx, self.num_experts)
        y = self.experts(x[token_idx], counts) * gates[:, None]
        return torch.zeros_like(x).index_add_(0, token_idx, y.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        routing = route_top_k(self.gate(x), self.top_k)
        capacity = self.capacity(routing, T)
        token_idx = torch.arange(T, device=x.device).repeat_interleave(self.top_k)
        expert_idx, gates = routing.expert_idx.flatten(), routing.gates.flatten()
        if capacity is None:
            dropped = torch.zeros((), dtype=torch.long, device=x.device)
        else:  # one nonzero (the sync that the variable number of kept assignments needs) serves all three
            kept = capacity_keep_mask(routing.expert_idx, routing.gates, capacity).flatten()
            dropped = (~kept).sum()
            kept_idx = kept.nonzero().squeeze(1)
            token_idx, expert_idx, gates = token_idx[kept_idx], expert_idx[kept_idx], gates[kept_idx]
        out = self.experts_forward(x, token_idx, expert_idx, gates)
        self.last_stats = {
            "aux_loss": self.aux_loss(routing, T),
            "routed": T * self.top_k,
            "dropped": dropped,
            "tokens_per_expert": routing.tokens_per_expert.detach(),
        }
        return out
