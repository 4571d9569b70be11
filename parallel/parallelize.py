"""`parallelize(model, topo)`: turn the single-process model into this rank's part of a parallel layout, in place.

Like torchtitan's `parallelize_*`, on a model built on the meta device (`build_model`): every layer is swapped
for its parallel version and every parameter keeps only this rank's block, described by its `ShardSpec`
(`parallel.shard`); `materialize` then allocates and initialises the blocks. Parameter names do not change, so
checkpoints (`parallel.checkpoint`) map between layouts by name. A whole model on a real device is cut the
same way (tests compare layouts with it).

Order: TP/SP (attention, embedding, LM head, norms), then CP (attention cores; `parallel.context_parallel`),
then the MoE: EP/ETP (`parallel.moe_parallel`) when ep*etp > 1, else `TensorParallelMoE` when TP or CP split
a micro-batch's tokens; parameters replicated over TP but fed different tokens (SP norms, the router) are
marked partial over TP.

Data: every TP rank of a DP replica gets the same micro-batches (SP splits tokens inside the model); DP ranks
take disjoint windows (`data_parallel_slice`); CP ranks then take their zigzag chunks (`parallel.zigzag`).
"""

from __future__ import annotations

from model.attention import LightningAttention, SoftmaxAttention
from model.moe import MoE

from .shard import finish_specs, mark_partial_over_tp
from .tensor_parallel import (
    TensorParallelCausalLM,
    TensorParallelLightningAttention,
    TensorParallelMoE,
    TensorParallelSoftmaxAttention,
    gather_from_sequence_region,
    scatter_to_sequence_region,
)
from .topology import Topology


def _split_moe_tokens(moe, tp_group) -> None:
    """Without SP, an expert-parallel MoE still needs distinct tokens per TP rank: slice in, gather out."""
    inner = moe.forward
    moe.forward = lambda x: gather_from_sequence_region(inner(scatter_to_sequence_region(x, tp_group)), tp_group)


def _apply_expert_parallel(model, topo: Topology, router_mode: str, overlap_groups: int) -> None:
    from .moe_parallel import parallelize_moe_layers

    # TP x CP peers share a micro-batch: the aux loss's gradient scale depends on it (see ExpertParallelMoE)
    parallelize_moe_layers(model, topo.ep_group, topo.etp_group, router_mode, overlap_groups,
                           ranks_per_micro_batch=topo.tp * topo.cp)
    for module in model.modules():
        if isinstance(module, MoE) and topo.tp > 1:
            mark_partial_over_tp(module.gate.weight)
            if not topo.sequence_parallel:
                _split_moe_tokens(module, topo.tp_group)


def parallelize(model, topo: Topology, *, router_mode: str | None = None, moe_overlap_groups: int | None = None,
                lasp_mode: str | None = None, window_len: int | None = None):
    """Make `model` (a MiniMaxForCausalLM) this rank's part of `topo`, in place; returns it.

    router_mode / moe_overlap_groups: EP's router rule and overlap groups (used when ep*etp > 1);
    lasp_mode / window_len: context parallelism's options (used when cp > 1; window_len = stage.seq_len).
    Unset options come from the parallel config (`topo.options`), then the defaults global / 1 / allgather /
    topo.seq_len.
    """
    opts = topo.options
    router_mode = router_mode or opts.get("router_mode") or "global"
    moe_overlap_groups = int(moe_overlap_groups or opts.get("moe_overlap_groups") or 1)
    lasp_mode = lasp_mode or opts.get("lasp_mode") or "allgather"
    window_len = window_len or topo.seq_len
    tp, sp = topo.tp_group, topo.sequence_parallel
    if topo.tp > 1:
        for layer in model.layers:
            if isinstance(layer.self_attn, LightningAttention):
                TensorParallelLightningAttention.convert(layer.self_attn, tp, sp)
            elif isinstance(layer.self_attn, SoftmaxAttention):
                TensorParallelSoftmaxAttention.convert(layer.self_attn, tp, sp)
            if sp:  # each TP rank normalises different tokens: its norm gradients are partial
                mark_partial_over_tp(layer.input_layernorm.weight)
                mark_partial_over_tp(layer.post_attention_layernorm.weight)
        if sp:
            mark_partial_over_tp(model.norm.weight)
        TensorParallelCausalLM.convert(model, tp, sp)
    if topo.cp > 1:
        from .context_parallel import apply_context_parallel

        apply_context_parallel(model, topo.cp_group, lasp_mode, window_len)
    if topo.ep * topo.etp > 1:
        _apply_expert_parallel(model, topo, router_mode, moe_overlap_groups)
    elif topo.tp > 1 or topo.cp > 1:  # one micro-batch's tokens are split over TP x CP: exact group routing
        for layer in model.layers:
            TensorParallelMoE.convert(layer.mlp, tp, sp, token_group=topo.tp_cp_group)
    finish_specs(model)
    model.topology = topo
    return model


def data_parallel_slice(num_items: int, topo: Topology) -> slice:
    """This DP rank's contiguous share of a global batch of `num_items` windows (or micro-batches)."""
    if num_items % topo.dp:
        raise ValueError(f"global batch of {num_items} windows is not divisible by the data-parallel size {topo.dp}")
    per_rank = num_items // topo.dp
    return slice(topo.dp_rank * per_rank, (topo.dp_rank + 1) * per_rank)
