"""Expert-parallel dispatch and combine: EP all-to-all, ETP all-gather / reduce-scatter, G overlapped token groups.

Layout (MoE parallel folding, docs/architecture.md, 'Parallel layouts'): the E experts are split over the EP group (rank j owns experts
j*E/EP .. (j+1)*E/EP - 1) and every expert's SwiGLU FFN is split over the ETP group along its hidden dimension
(rank q holds columns q*F/ETP .. of w_gate/w_up and the same rows of w_down). Every rank holds different tokens.

One token group goes through
    permute by expert -> all-to-all over EP (uneven) -> all-gather over ETP -> sort by local expert
    -> grouped SwiGLU products on 1/ETP of each FFN -> unsort -> reduce-scatter over ETP (sums the FFN slices)
    -> all-to-all back over EP -> unpermute, weight by gates, sum per token.
The kept assignments are split into G groups of contiguous tokens; on CUDA each group runs on its own stream
so one group's communication overlaps another's expert products. On CPU the same stages run in the same order,
one after another. G changes no arithmetic: the results are identical.

The all-gather over ETP pads every rank's rows to the largest count (the collectives need equal sizes); the
padding rows are never read. Each stage is issued for all groups before the next stage, in the same order on
every rank, so the collectives match up; a rank with no rows still runs every collective (forward and backward).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.moe import SwiGLUExperts, count_per_expert, swiglu_products

from .collectives import all_gather, all_to_all, group_rank, group_size, reduce_scatter
from .global_router import gather_group_counts
from .shard import shard_parameter


def check_expert_parallel_sizes(num_experts: int, ffn_hidden_size: int, ep: int, etp: int,
                                overlap_groups: int = 1) -> None:
    """One-line ValueError naming the setting when experts or FFN columns cannot be split evenly."""
    if num_experts % ep:
        raise ValueError(f"parallel.ep={ep} does not divide model.num_experts={num_experts}")
    if ffn_hidden_size % etp:
        raise ValueError(f"parallel.etp={etp} does not divide model.ffn_hidden_size={ffn_hidden_size}")
    if overlap_groups < 1:
        raise ValueError(f"moe.overlap_groups={overlap_groups} must be >= 1")


def shard_experts(experts: SwiGLUExperts, ep: int, ep_rank: int, etp: int, etp_rank: int) -> SwiGLUExperts:
    """Keep this rank's E/EP experts, each with its 1/ETP slice of the FFN hidden dimension (in place)."""
    E, _, ffn = experts.w_gate.shape
    check_expert_parallel_sizes(E, ffn, ep, etp)
    for name, ffn_dim in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
        shard_parameter(experts, name, [(0, "ep", ep, ep_rank), (ffn_dim, "etp", etp, etp_rank)], expert=True)
    return experts


@dataclass
class _GroupPlan:
    """Host-side sizes of one token group on this rank."""
    send_splits: list[int]  # rows to each EP rank
    recv_splits: list[int]  # rows from each EP rank
    pad: int  # rows per ETP rank in the padded all-gather
    rows_mine: int  # rows this rank received over EP (its block of the ETP gather)
    # The gathered buffer's blocks in local-expert order: block k is rows [start, start + block_rows[k]) of the
    # padded gathered buffer and lands at output row out_start; block_shift[k] = start - out_start.
    block_rows: list[int]
    block_shift: list[int]
    tokens_per_local_expert: list[int]


def _plan(counts, g: int, ep_rank: int, etp_rank: int, experts_local: int) -> _GroupPlan:
    """counts[i][p][g][e]: kept assignments of rank (ep i, etp p) in group g for expert e (nested lists)."""
    ep, etp = len(counts), len(counts[0])
    mine = slice(ep_rank * experts_local, (ep_rank + 1) * experts_local)
    row = counts[ep_rank][etp_rank][g]
    send = [sum(row[j * experts_local:(j + 1) * experts_local]) for j in range(ep)]
    # After the EP all-to-all, rank (., p) holds rows ordered by source EP rank i, then by local expert.
    block = [[counts[i][p][g][mine] for i in range(ep)] for p in range(etp)]  # block[p][i][l]
    rows = [sum(sum(b) for b in block[p]) for p in range(etp)]
    pad = max(rows) if etp == 1 else max(max(rows), 1)  # no zero-size collectives
    start = {}
    for p in range(etp):
        offset = p * pad
        for i in range(ep):
            for l in range(experts_local):
                start[p, i, l] = offset
                offset += block[p][i][l]
    block_rows, block_shift, per_expert, out = [], [], [], 0
    for l in range(experts_local):  # local-expert order; within an expert: ETP peer, then source EP rank
        n = 0
        for p in range(etp):
            for i in range(ep):
                block_rows.append(block[p][i][l])
                block_shift.append(start[p, i, l] - out)
                out += block[p][i][l]
                n += block[p][i][l]
        per_expert.append(n)
    recv = [sum(block[etp_rank][i]) for i in range(ep)]
    return _GroupPlan(send, recv, pad, rows[etp_rank], block_rows, block_shift, per_expert)


def _device_indices(plans: list[_GroupPlan], device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per group: every expert row's position in the gathered buffer, and rows per local expert, on the device.

    Made from a few small host lists in one non-blocking copy, before the groups start: a blocking copy on a
    group's stream would make the host wait for that stream and so serialize the groups.
    """
    shifts, base = [], 0
    for p in plans:  # positions of all groups come out of one repeat_interleave over their concatenated output
        shifts += [s - base for s in p.block_shift]
        base += sum(p.block_rows)
    sizes = [n for p in plans for n in p.block_rows]
    per_expert = [n for p in plans for n in p.tokens_per_local_expert]
    host = torch.tensor([*shifts, *sizes, *per_expert], dtype=torch.long)
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    shift_d, sizes_d, per_expert_d = dev.split([len(shifts), len(sizes), len(per_expert)])
    positions = torch.repeat_interleave(shift_d, sizes_d, output_size=base) + torch.arange(base, device=device)
    return list(positions.split([sum(p.block_rows) for p in plans])), list(per_expert_d.view(len(plans), -1))


_streams: dict = {}


def _group_streams(device: torch.device, n: int) -> list:
    key = (device, n)
    if key not in _streams:
        _streams[key] = [torch.cuda.Stream(device) for _ in range(n)]
    return _streams[key]


def expert_parallel_forward(x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor,
                            gates: torch.Tensor, experts: SwiGLUExperts, num_experts: int, ep_group, etp_group,
                            overlap_groups: int = 1) -> torch.Tensor:
    """MoE.experts_forward over EP x ETP: the kept assignments (token_idx, expert_idx, gates) -> output [T, h]."""
    T, G = x.shape[0], overlap_groups
    ep, etp = group_size(ep_group), group_size(etp_group)
    ep_rank, etp_rank = group_rank(ep_group), group_rank(etp_group)
    experts_local = num_experts // ep

    # Permute by (token group, expert): groups are contiguous token ranges, so each row's group is known locally.
    key = (token_idx * G // max(T, 1)) * num_experts + expert_idx
    order = torch.sort(key, stable=True).indices
    counts = count_per_expert(key, G * num_experts).view(G, num_experts)
    counts_all = gather_group_counts(counts, (etp_group, ep_group)).view(ep, etp, G, num_experts).tolist()
    plans = [_plan(counts_all, g, ep_rank, etp_rank, experts_local) for g in range(G)]
    # Expert products run in the autocast dtype when autocast is on (so bf16 takes the grouped path); the weights
    # are cast once here, on the main stream, where their gradients then accumulate.
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    weights = [w.to(dtype).view(w.shape) for w in (experts.w_gate, experts.w_up, experts.w_down)]
    x_send = x[token_idx[order]].to(dtype)
    chunks = x_send.split([sum(p.send_splits) for p in plans])

    positions, per_expert = _device_indices(plans, x.device)

    streams = _group_streams(x.device, G) if x.is_cuda and G > 1 else None
    if streams is not None:
        main = torch.cuda.current_stream(x.device)
        for s in streams:  # tensors made on the main stream and used on s stay allocated until s is done
            s.wait_stream(main)
            for t in (x_send, *positions, *per_expert, *weights):
                t.record_stream(s)

    def on_stream(g):
        return torch.cuda.stream(streams[g]) if streams is not None else nullcontext()

    # Stage-major issue order: all dispatches, then all expert products, then all combines. On CUDA, group g's
    # products run on its stream while later groups' collectives proceed on the communicators' streams.
    dispatched = []
    for g, plan in enumerate(plans):
        with on_stream(g):
            received = all_to_all(chunks[g], plan.recv_splits, plan.send_splits, ep_group)
            if etp > 1:
                received = F.pad(received, (0, 0, 0, plan.pad - plan.rows_mine))
            dispatched.append(all_gather(received, etp_group)[positions[g]])
    computed = []
    for g in range(G):
        with on_stream(g):
            computed.append(swiglu_products(dispatched[g], per_expert[g], *weights))
    returned = []
    for g, plan in enumerate(plans):
        with on_stream(g):
            y = computed[g]
            padded = y.new_zeros(etp * plan.pad, y.shape[1]).index_copy(0, positions[g], y)
            mine = reduce_scatter(padded, etp_group)[:plan.rows_mine]
            returned.append(all_to_all(mine, plan.send_splits, plan.recv_splits, ep_group))
    if streams is not None:
        for g, s in enumerate(streams):
            main.wait_stream(s)
            returned[g].record_stream(main)

    y = torch.cat(returned).to(x.dtype) * gates[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_idx[order], y)
