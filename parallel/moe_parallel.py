"""The expert-parallel version of `model.moe.MoE` (EP x ETP, global or local router), converted in place.

The conversion keeps the router (replicated, a dense parameter), keeps this rank's block of the experts, and
overrides the three seams of MoE: `capacity` (global or local rule on the router group's gathered demand),
`aux_loss` (group statistics in global mode) and `experts_forward` (the EP/ETP dispatcher).
"""

from __future__ import annotations

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
from .shard import mark_partial_over_tp
from .tensor_parallel import gather_from_sequence_region, scatter_to_sequence_region


class ExpertParallelMoE(MoE):
    """MoE whose experts live on EP x ETP ranks; every rank routes its own tokens.

    last_stats keeps the model's per-rank keys (aux_loss, routed, dropped, tokens_per_expert) and adds the
    router group's: drop_rate, group_routed, group_dropped, group_tokens_per_expert, group_kept_per_expert,
    load_share_min/max/mean.
    """

    @classmethod
    def convert(cls, moe: MoE, ep_group, etp_group, router_mode: str = "global", overlap_groups: int = 1,
                ranks_per_micro_batch: int = 1, tp_group=None, split_tokens: bool = False) -> ExpertParallelMoE:
        """Make `moe` this rank's expert-parallel MoE in place (every rank of the EP x ETP group calls it).

        ranks_per_micro_batch: ranks that hold parts of one micro-batch (tp * cp), for the aux loss's gradient
        scale; tp_group: under TP the router sees different tokens per TP rank (its gradient is partial over TP);
        split_tokens: TP without SP hands every TP rank all tokens, so each routes its contiguous 1/tp of them."""
        ep, etp = group_size(ep_group), group_size(etp_group)
        E, _, ffn = moe.experts.w_gate.shape
        check_expert_parallel_sizes(E, ffn, ep, etp, overlap_groups)
        if router_mode not in ROUTER_MODES:
            raise ValueError(f"router.mode={router_mode!r} must be one of {list(ROUTER_MODES)}")
        moe.__class__ = cls
        shard_experts(moe.experts, ep, group_rank(ep_group), etp, group_rank(etp_group))
        if group_size(tp_group) > 1:
            mark_partial_over_tp(moe.gate.weight)
        moe.tp_group, moe.split_tokens = tp_group, split_tokens
        moe.ep_group, moe.etp_group = ep_group, etp_group
        moe.router_mode, moe.overlap_groups = router_mode, overlap_groups
        # Router group = EP x ETP ranks, ETP index fastest; see parallel/global_router.py.
        moe.router_rank = group_rank(ep_group) * etp + group_rank(etp_group)
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
        moe.aux_loss_scale = group_ranks / float(ranks_per_micro_batch)
        moe._group_counts = None
        return moe

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
        if self.split_tokens:
            x = scatter_to_sequence_region(x, self.tp_group)
        out = super().forward(x)
        self.last_stats.update(group_stats(*self._group_counts))
        self._group_counts = None
        return gather_from_sequence_region(out, self.tp_group) if self.split_tokens else out
