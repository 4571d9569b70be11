"""Swap a single-process `model.moe.MoE` for its expert-parallel version (EP x ETP, global or local router).

The swap keeps the router (replicated, a dense parameter), slices this rank's experts out of the full weights,
and overrides the three seams of MoE: `capacity` (global or local rule on the router group's gathered demand),
`aux_loss` (group statistics in global mode) and `experts_forward` (the EP/ETP dispatcher).
"""

from __future__ import annotations

from torch import nn

from model.moe import MoE, Routing

from .collectives import group_rank, group_size
from .expert_parallel import check_expert_parallel_sizes, expert_parallel_forward, shard_experts
from .global_router import (
    ROUTER_MODES,
    capacity_per_rank,
    gather_group_counts,
    group_aux_loss,
    group_stats,
    kept_counts,
    scale_grad,
)


class ExpertParallelMoE(MoE):
    """MoE whose experts live on EP x ETP ranks; every rank routes its own tokens.

    last_stats keeps the model's per-rank keys (aux_loss, routed, dropped, tokens_per_expert) and adds the
    router group's: drop_rate, group_routed, group_dropped, group_tokens_per_expert, group_kept_per_expert,
    load_share_min/max/mean.
    """

    def __init__(self, moe: MoE, ep_group, etp_group, router_mode: str = "global", overlap_groups: int = 1,
                 ranks_per_micro_batch: int = 1):
        nn.Module.__init__(self)
        ep, etp = group_size(ep_group), group_size(etp_group)
        E, _, ffn = moe.experts.w_gate.shape
        check_expert_parallel_sizes(E, ffn, ep, etp, overlap_groups)
        if router_mode not in ROUTER_MODES:
            raise ValueError(f"router.mode={router_mode!r} must be one of {list(ROUTER_MODES)}")
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.capacity_factor, self.aux_loss_coef = moe.capacity_factor, moe.aux_loss_coef
        self.gate = moe.gate
        self.experts = shard_experts(moe.experts, ep, group_rank(ep_group), etp, group_rank(etp_group))
        self.ep_group, self.etp_group = ep_group, etp_group
        self.router_mode, self.overlap_groups = router_mode, overlap_groups
        # Router group = EP x ETP ranks, ETP index fastest; see parallel/global_router.py.
        self.router_rank = group_rank(ep_group) * etp + group_rank(etp_group)
        # Aux-loss convention, the same for every layout (single process, DP, TP, CP, EP, global or local rule):
        # a step's aux loss is the MEAN over all router groups and micro-batches of the Switch loss computed on
        # that router group's tokens. A router group is one micro-batch for the plain model, TP and CP (whose
        # TensorParallelMoE routes the TP x CP token group exactly), the EP x ETP ranks' tokens under the global
        # rule, and one rank's tokens under the local rule. Every rank reports its group's value (so the mean
        # over all ranks is the step's aux loss), and the trainer backprops aux / (micro-batches per rank * dp)
        # on every rank. Each rank's backward carries only its own tokens' share, so the shares summed over a
        # group must be scaled by dp / (router groups) = (router group size) / (ranks per micro-batch):
        # ep*etp / (tp*cp) for the global rule, 1 / (tp*cp) for the local rule (tests/test_trainer_parallel.py).
        group_ranks = ep * etp if router_mode == "global" else 1
        self.aux_loss_scale = group_ranks / float(ranks_per_micro_batch)
        self.last_stats = {}
        self._group_counts = None

    def capacity(self, routing: Routing, num_tokens: int):
        demand = gather_group_counts(routing.tokens_per_expert, (self.etp_group, self.ep_group))
        capacity = capacity_per_rank(self.router_mode, demand, self.top_k, self.capacity_factor)
        self._group_counts = (demand, kept_counts(demand, capacity))
        return None if capacity is None else capacity[self.router_rank]

    def aux_loss(self, routing: Routing, num_tokens: int):
        if self.router_mode == "local":
            return scale_grad(super().aux_loss(routing, num_tokens), self.aux_loss_scale)
        demand = self._group_counts[0]
        group_tokens = demand.sum() // self.top_k
        return group_aux_loss(routing.probs, demand.sum(0), group_tokens, self.top_k, self.aux_loss_coef,
                              (self.etp_group, self.ep_group), self.aux_loss_scale)

    def experts_forward(self, x, token_idx, expert_idx, gates):
        return expert_parallel_forward(x, token_idx, expert_idx, gates, self.experts, self.num_experts,
                                       self.ep_group, self.etp_group, self.overlap_groups)

    def forward(self, x):
        out = super().forward(x)
        self.last_stats.update(group_stats(*self._group_counts))
        self._group_counts = None
        return out


def make_moe_expert_parallel(moe: MoE, ep_group, etp_group, router_mode: str = "global", overlap_groups: int = 1,
                             ranks_per_micro_batch: int = 1) -> ExpertParallelMoE:
    """The expert-parallel replacement of `moe` for this rank (call on every rank, same full weights).

    ranks_per_micro_batch: ranks that hold parts of one micro-batch (tp * cp); sets the aux loss's gradient scale."""
    return ExpertParallelMoE(moe, ep_group, etp_group, router_mode, overlap_groups, ranks_per_micro_batch)


def parallelize_moe_layers(model: nn.Module, ep_group, etp_group, router_mode: str = "global",
                           overlap_groups: int = 1, ranks_per_micro_batch: int = 1) -> nn.Module:
    """Replace every MoE submodule of `model` in place (e.g. `layer.mlp` of each decoder layer)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MoE:
                setattr(parent, name, make_moe_expert_parallel(child, ep_group, etp_group, router_mode,
                                                               overlap_groups, ranks_per_micro_batch))
    return model
