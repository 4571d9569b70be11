"""`parallelize(model, topo)`: turn the single-process model into this rank's part of a parallel layout, in place.

Like torchtitan's `parallelize_*`, on a model built on the meta device (`build_model`): every layer is swapped
for its parallel version and every parameter keeps only this rank's block, described by its `ShardSpec`
(`parallel.shard`); `materialize` then allocates and initialises the blocks. Parameter names do not change, so
checkpoints (`parallel.checkpoint`) map between layouts by name. A whole model on a real device is cut the
same way (tests compare layouts with it).

Pipeline parallelism comes first: the model keeps only this rank's stages (`parallel.pipeline`).
One mechanism: every layer that changes is converted in place to its parallel subclass (`Cls.convert`), once,
with all of its dimensions: attention for TP x CP (`parallel.attention_parallel`), the MoE for EP x ETP
(`parallel.moe_parallel`) or, with replicated experts, for the TP x CP token group
(`parallel.tensor_parallel.TensorParallelMoE`), and the model for the vocabulary-parallel embedding and head.
Parameters replicated over TP but fed different tokens (SP norms, the router) are marked partial over TP.

Data: every TP rank of a DP replica gets the same micro-batches (SP splits tokens inside the model); DP ranks
take disjoint windows (`data_parallel_slice`); CP ranks then take their zigzag chunks (`parallel.zigzag`).
"""

from __future__ import annotations

from .attention_parallel import ContextParallel, parallelize_attention
from .moe_parallel import ExpertParallelMoE
from .shard import finish_specs, mark_partial_over_tp
from .tensor_parallel import TensorParallelCausalLM, TensorParallelMoE
from .topology import Topology


def parallelize(model, topo: Topology, *, router_mode: str | None = None, moe_overlap_groups: int | None = None,
                lasp_mode: str | None = None, window_len: int | None = None):
    """Make `model` (a MiniMaxForCausalLM) this rank's part of `topo`, in place; returns it.

    router_mode / moe_overlap_groups: EP's router rule and overlap groups (used when ep*etp > 1);
    lasp_mode / window_len: context parallelism's options (used when cp > 1; window_len = stage.seq_len).
    Unset options come from the parallel config (`topo.options`), then the defaults global / 1 / allgather /
    topo.seq_len.
    """
    opts = topo.options
    if topo.pp > 1:  # first: nothing of other stages is converted
        from .pipeline import keep_local_stages, plan_pipeline

        plan = plan_pipeline(model.cfg, topo.pp, opts.get("pp_schedule") or "1f1b", opts.get("virtual_stages") or 1,
                             opts.get("pp_layers"), window_len or topo.seq_len or 4096)
        keep_local_stages(model, plan, topo.pp_rank)
    router_mode = router_mode or opts.get("router_mode") or "global"
    moe_overlap_groups = int(moe_overlap_groups or opts.get("moe_overlap_groups") or 1)
    cp = None
    if topo.cp > 1:
        cp = ContextParallel.for_window(topo.cp_group, window_len or topo.seq_len,
                                        lasp_mode or opts.get("lasp_mode") or "allgather")
    tp, sp = topo.tp_group, topo.sequence_parallel
    for layer in model.layers.values():
        if topo.tp > 1 or cp is not None:
            parallelize_attention(layer.self_attn, tp, sp, cp)
        if topo.tp > 1 and sp:  # each TP rank normalises different tokens: its norm gradients are partial
            mark_partial_over_tp(layer.input_layernorm.weight)
            mark_partial_over_tp(layer.post_attention_layernorm.weight)
        if topo.ep * topo.etp > 1:
            # TP x CP peers share a micro-batch: the aux loss's gradient scale depends on it
            ExpertParallelMoE.convert(layer.mlp, topo.ep_group, topo.etp_group, router_mode, moe_overlap_groups,
                                      ranks_per_micro_batch=topo.tp * topo.cp, tp_group=tp,
                                      split_tokens=topo.tp > 1 and not sp)
        elif topo.tp > 1 or cp is not None:  # one micro-batch's tokens are split over TP x CP: exact group routing
            TensorParallelMoE.convert(layer.mlp, tp, sp, token_group=topo.tp_cp_group)
    if topo.tp > 1:
        if sp and model.norm is not None:
            mark_partial_over_tp(model.norm.weight)
        TensorParallelCausalLM.convert(model, tp, sp)
    finish_specs(model)
    model.topology = topo
    return model


def data_parallel_slice(num_items: int, topo: Topology) -> slice:
    """This DP rank's contiguous share of a global batch of `num_items` windows (or micro-batches)."""
    if num_items % topo.dp:
        raise ValueError(f"global batch of {num_items} windows is not divisible by the data-parallel size {topo.dp}")
    per_rank = num_items // topo.dp
    return slice(topo.dp_rank * per_rank, (topo.dp_rank + 1) * per_rank)
