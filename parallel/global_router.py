"""The global router: one expert capacity for the whole router group, allotted to ranks by their demand.

The router group is every rank whose tokens reach the same expert instances: the EP x ETP ranks of one
expert-data-parallel replica (each of them holds different tokens: data, context or sequence-parallel shards).
Its "global batch" is the concatenation of the ranks' tokens in group order (ETP index fastest, then EP, as in
MoE parallel folding).

Global rule (docs/architecture.md, 'Parallel layouts'): C_e = ceil(cf * T_group * k / E). When expert e's total demand D_e exceeds C_e, rank r
gets floor(C_e * d_re / D_e) slots, and the slots left over go one each to ranks in rank order (only ranks whose
share has a fractional part), so every slot is used. Each rank keeps its highest-gate assignments within its allotment.
Local rule (Megatron's): every rank applies C = ceil(cf * T_r * k / E) to its own tokens.

Everything here except `gather_group_counts` and `group_aux_loss` is a pure function of the gathered demand, so the single-process
reference and the parallel layer share one implementation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.moe import capacity_keep_mask, count_per_expert

from .collectives import all_reduce

ROUTER_MODES = ("global", "local")


def allot_capacity(demand: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """allotment[R, E] of capacity[E] to ranks with demand[R, E] (integer tensors).

    Experts whose total demand fits get exactly the demand. Over-subscribed experts: floor of the proportional
    share, then the remainder one slot each to the first ranks (in rank order) whose share has a fractional part.
    """
    demand = demand.long()
    capacity = capacity.long().to(demand.device)
    total = demand.sum(0)
    scaled = demand * capacity  # exact integer share numerators
    floor = scaled // total.clamp(min=1)
    remainder = capacity - floor.sum(0)
    # Only ranks with a fractional share compete for the remainder (there are always enough of them), so every
    # rank ends at the floor or the ceiling of its exact share, never above its demand.
    eligible = scaled % total.clamp(min=1) != 0
    # Position of each eligible rank among the eligible ranks of its expert (1-based, rank order).
    position = torch.cumsum(eligible.long(), 0)
    bonus = (eligible & (position <= remainder)).long()
    return torch.where(total > capacity, floor + bonus, demand)


def capacity_per_rank(mode: str, demand: torch.Tensor, top_k: int, capacity_factor: float | None) -> torch.Tensor | None:
    """Capacity[R, E] each rank applies to its own tokens under `mode`, or None (no drop)."""
    if mode not in ROUTER_MODES:
        raise ValueError(f"router.mode={mode!r} must be one of {list(ROUTER_MODES)}")
    if capacity_factor is None:
        return None
    R, E = demand.shape
    tokens = demand.sum(1) // top_k  # every token makes exactly top_k assignments
    if mode == "local":
        return expert_capacity(tokens, top_k, E, capacity_factor)[:, None].expand(R, E)
    return allot_capacity(demand, expert_capacity(tokens.sum(), top_k, E, capacity_factor).expand(E))


def expert_capacity(num_tokens: torch.Tensor, top_k: int, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """model.moe.expert_capacity on a device tensor (same float64 operations, so the same integers; no sync)."""
    return torch.ceil(capacity_factor * num_tokens.double() * top_k / num_experts).long()


def kept_counts(demand: torch.Tensor, capacity: torch.Tensor | None) -> torch.Tensor:
    """Assignments kept per rank and expert: the top-gate rule keeps min(demand, capacity)."""
    return demand if capacity is None else torch.minimum(demand, capacity)


def group_keep_mask(expert_idx: torch.Tensor, gates: torch.Tensor, rank_sizes: list[int], mode: str,
                    capacity_factor: float | None, num_experts: int) -> torch.Tensor:
    """Single-process reference: keep mask [T, k] for the concatenated batch of ranks with `rank_sizes` tokens.

    Each rank's segment keeps its top-gate assignments within its capacity; done in one call by giving every
    (rank, expert) pair its own virtual expert id.
    """
    top_k = expert_idx.shape[1]
    rank_of_token = torch.repeat_interleave(torch.arange(len(rank_sizes)), torch.tensor(rank_sizes))
    virtual = expert_idx + num_experts * rank_of_token.to(expert_idx.device)[:, None]
    demand = count_per_expert(virtual, len(rank_sizes) * num_experts).view(-1, num_experts)
    capacity = capacity_per_rank(mode, demand, top_k, capacity_factor)
    if capacity is None:
        return torch.ones_like(expert_idx, dtype=torch.bool)
    return capacity_keep_mask(virtual, gates, capacity.flatten())


def gather_group_counts(counts: torch.Tensor, groups) -> torch.Tensor:
    """Stack every router-group rank's `counts` (same shape everywhere): returns [R, *counts.shape].

    `groups` are nested, innermost (fastest-varying rank index) first, e.g. (etp_group, ep_group); the result is
    ordered with the first group's index fastest. Not differentiable (counts only).
    """
    out = counts[None]
    for group in groups:
        n = 1 if group is None else dist.get_world_size(group)
        if n == 1:
            continue
        parts = [torch.empty_like(out) for _ in range(n)]
        dist.all_gather(parts, out.contiguous(), group=group)
        out = torch.cat(parts)  # the outer index becomes the slowest one
    return out


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward, `scale` times its gradient in the backward."""
    return x if scale == 1 else x.detach() + scale * (x - x.detach())


def group_aux_loss(probs: torch.Tensor, group_demand: torch.Tensor, group_tokens, top_k: int, coef: float,
                   groups, grad_scale: float) -> torch.Tensor:
    """Switch aux loss on the router group's statistics: the group's value on every rank.

    f_i comes from the group's demand, P_i from the probability sums all-reduced over `groups` (identity backward,
    so each rank's gradient is its own tokens' share). The gradient is multiplied by `grad_scale`, the number of
    data-parallel replicas in the router group: the trainer weights every replica's aux by 1/DP and sums
    gradients, so the group's replicas together must carry the group's gradient that many times.
    """
    E = probs.shape[-1]
    prob_sum = probs.sum(0)
    for group in groups:
        prob_sum = all_reduce(prob_sum, group)
    f = group_demand.float() / (group_tokens * top_k)
    aux = coef * E * torch.sum(f.detach() * prob_sum / group_tokens)
    return scale_grad(aux, grad_scale)


def group_stats(demand: torch.Tensor, kept: torch.Tensor) -> dict:
    """Drop rate and per-expert load shares of the router group (tensors, no host sync)."""
    group_demand, group_kept = demand.sum(0), kept.sum(0)
    routed = group_demand.sum()
    share = group_demand.double() / routed.clamp(min=1)
    return {
        "group_tokens_per_expert": group_demand,
        "group_kept_per_expert": group_kept,
        "group_routed": routed,
        "group_dropped": routed - group_kept.sum(),
        "drop_rate": (routed - group_kept.sum()).double() / routed.clamp(min=1),
        # share of the group's routed assignments per expert; 1/E everywhere is perfect balance
        "load_share_min": share.min(),
        "load_share_max": share.max(),
        "load_share_mean": share.mean(),
    }


def summarize_moe_stats(stats: list[dict]) -> dict[str, float]:
    """Per-step log line over MoE layers: group drop rate and the extreme per-expert load shares."""
    routed = sum(float(s["group_routed"]) for s in stats)
    dropped = sum(float(s["group_dropped"]) for s in stats)
    return {
        "moe/drop_rate": dropped / max(routed, 1.0),
        "moe/load_share_min": min(float(s["load_share_min"]) for s in stats),
        "moe/load_share_max": max(float(s["load_share_max"]) for s in stats),
        "moe/load_share_mean": sum(float(s["load_share_mean"]) for s in stats) / len(stats),
    }
