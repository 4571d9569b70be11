"""The global router: capacity allotment by hand, the reference keep mask, global vs local drops."""

import pytest
import torch

from model.moe import capacity_keep_mask, route_top_k
from parallel.global_router import (
    allot_capacity,
    capacity_per_rank,
    group_keep_mask,
    group_stats,
    kept_counts,
    summarize_moe_stats,
)


def test_allotment_by_hand():
    demand = torch.tensor([[3, 1, 0, 3],
                           [2, 1, 2, 3],
                           [1, 0, 0, 3]])
    capacity = torch.tensor([4, 4, 1, 5])
    # e0: D=6 > 4: exact shares 2, 1.33, 0.67 -> floors 2, 1, 0 (sum 3); one slot left: rank 0's share is whole,
    # so rank 1 takes it. e1: D=2 fits, everyone keeps its demand. e2: D=2 > 1: shares 0, 1, 0 -> floors use it.
    # e3: D=9 > 5: shares 1.67 each -> floors 1, 1, 1 (sum 3); two slots left -> ranks 0 and 1.
    expected = torch.tensor([[2, 1, 0, 2],
                             [2, 1, 1, 2],
                             [0, 0, 0, 1]])
    assert torch.equal(allot_capacity(demand, capacity), expected)


def test_allotment_remainder_in_rank_order_among_fractional_shares():
    # D=8 > 4: shares 0, 2, 1.5, 0.5 -> floors 0, 2, 1, 0 (sum 3); the slot left skips ranks 0 and 1 (whole
    # shares) and goes to rank 2, the first with a fractional share.
    demand = torch.tensor([[0], [4], [3], [1]])
    assert allot_capacity(demand, torch.tensor([4])).flatten().tolist() == [0, 2, 2, 0]
    # Two slots left over three fractional ranks: the first two in rank order.
    demand = torch.tensor([[1], [1], [1]])
    assert allot_capacity(demand, torch.tensor([2])).flatten().tolist() == [1, 1, 0]


def test_allotment_properties_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        R, E = torch.randint(1, 6, (2,), generator=g).tolist()
        demand = torch.randint(0, 20, (R, E), generator=g)
        capacity = torch.randint(0, 40, (E,), generator=g)
        allot = allot_capacity(demand, capacity)
        assert (allot >= 0).all() and (allot <= demand).all()
        assert torch.equal(allot.sum(0), torch.minimum(demand.sum(0), capacity))  # every slot used
        share = demand * capacity / demand.sum(0).clamp(min=1)
        over = demand.sum(0) > capacity
        assert ((allot - share).abs()[:, over] < 1).all()  # proportional up to one slot


def test_capacity_rules_by_hand():
    # 2 ranks x 6 tokens, top-1, 3 experts, cf 1: local C = 2 per rank; global C = 4 per expert.
    demand = torch.tensor([[6, 0, 0],
                           [1, 2, 3]])
    local = capacity_per_rank("local", demand, 1, 1.0)
    assert local.tolist() == [[2, 2, 2], [2, 2, 2]]
    assert kept_counts(demand, local).sum().item() == 2 + 5
    glob = capacity_per_rank("global", demand, 1, 1.0)
    # e0: D=7 > 4: floors 3, 0 -> one slot left -> rank 0 (3 < 6). e1, e2 fit.
    assert glob.tolist() == [[4, 0, 0], [0, 2, 3]]
    assert kept_counts(demand, glob).sum().item() == 9
    assert capacity_per_rank("global", demand, 1, None) is None
    with pytest.raises(ValueError, match="router.mode"):
        capacity_per_rank("nearest", demand, 1, 1.0)


def test_group_keep_mask_keeps_each_ranks_top_gates():
    # Two ranks of 3 tokens, top-1, 2 experts, cf 1: global C = ceil(6 * 1 / 2) = 3 per expert.
    expert_idx = torch.tensor([[0], [0], [0], [0], [1], [0]])
    gates = torch.tensor([[0.5], [0.9], [0.7], [0.6], [1.0], [0.8]])
    # Demand e0: rank 0 -> 3, rank 1 -> 2; D=5 > 3: floors 1 (1.8), 1 (1.2), one slot left -> rank 0.
    keep = group_keep_mask(expert_idx, gates, [3, 3], "global", 1.0, 2)
    assert keep.flatten().tolist() == [False, True, True, False, True, True]
    # Local: C = ceil(3 / 2) = 2 per rank: rank 0 keeps 0.9, 0.7; rank 1 keeps both of its e0 tokens.
    keep = group_keep_mask(expert_idx, gates, [3, 3], "local", 1.0, 2)
    assert keep.flatten().tolist() == [False, True, True, True, True, True]
    # One rank: the global rule is the model's rule.
    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    r = route_top_k(logits, 2)
    model_keep = capacity_keep_mask(r.expert_idx, r.gates, torch.full((4,), 7))
    assert torch.equal(group_keep_mask(r.expert_idx, r.gates, [20], "global", 0.7, 4), model_keep)


def _dropped(mode, demand, top_k, cf):
    return int((demand - kept_counts(demand, capacity_per_rank(mode, demand, top_k, cf))).sum())


def test_global_never_drops_more_on_skewed_batches():
    # Equal tokens per rank and cf * T * k / E integral, so the group capacity equals the sum of the local ones.
    g = torch.Generator().manual_seed(0)
    R, T, E, k, cf = 4, 16, 8, 2, 1.0
    strictly_fewer = 0
    for trial in range(100):
        skew = torch.randn(R, E, generator=g) * (trial % 5)  # per-rank preference, from none to strong
        logits = torch.randn(R, T, E, generator=g) + skew[:, None, :]
        demand = torch.stack([route_top_k(logits[r], k).tokens_per_expert for r in range(R)])
        glob, loc = _dropped("global", demand, k, cf), _dropped("local", demand, k, cf)
        assert glob <= loc
        strictly_fewer += glob < loc
    assert strictly_fewer > 0


def test_global_drops_strictly_fewer_in_constructed_case():
    # Rank 0 sends everything to experts 0/1, rank 1 to experts 2/3 (8 tokens each, top-2, 4 experts, cf 1).
    # Local: C = 4 per rank, each rank drops 4 per expert -> 16 dropped. Global: C = 8 per expert = demand -> 0.
    demand = torch.tensor([[8, 8, 0, 0],
                           [0, 0, 8, 8]])
    assert _dropped("local", demand, 2, 1.0) == 16
    assert _dropped("global", demand, 2, 1.0) == 0


def test_group_stats_and_summary():
    demand = torch.tensor([[6, 0, 0], [1, 2, 3]])
    kept = kept_counts(demand, capacity_per_rank("local", demand, 1, 1.0))
    s = group_stats(demand, kept)
    assert int(s["group_routed"]) == 12 and int(s["group_dropped"]) == 5
    assert float(s["drop_rate"]) == pytest.approx(5 / 12)
    assert float(s["load_share_max"]) == pytest.approx(7 / 12) and float(s["load_share_min"]) == pytest.approx(2 / 12)
    line = summarize_moe_stats([s, s])
    assert line["moe/drop_rate"] == pytest.approx(5 / 12) and line["moe/load_share_mean"] == pytest.approx(1 / 3)
