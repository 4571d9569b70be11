"""`apply_context_parallel`: put a model instance on the zigzag context-parallel layout (DESIGN §3).

Swaps the sequence-mixing cores of every attention layer: `LightningAttention.mix` -> LASP+,
`SoftmaxAttention.mix` -> varlen ring attention. Everything else in the model is per token except the MoE's
capacity and aux loss, which must cover the whole window: `parallelize` gives every MoE its parallel version
over the TP x CP token group (`TensorParallelMoE(token_group=...)` or `ExpertParallelMoE`).

Under CP, each rank calls the model on its local tokens from `parallel.zigzag.shard_batch`:
    out = model(local["input_ids"], local["cu_seqlens"], local["labels"], positions=local["positions"])
`positions` (global position within the document) must be given explicitly; `cu_seqlens` are the local
segments. Loss over the whole window: backprop `out.loss_sum / local["num_tokens"] + out.aux_loss` on every
rank and SUM the gradients of replicated parameters over CP (they sync over DP x CP anyway); the window's
mean loss is `all_reduce(out.loss_sum) / num_tokens`. With the MoE converted as above, `out.aux_loss` is
already the whole-window value.
"""

from __future__ import annotations

from model.attention import LightningAttention, SoftmaxAttention
from parallel.collectives import group_size
from parallel.lasp import LASP_MODES, lasp_lightning_attention
from parallel.ring_attention import ring_attention
from parallel.zigzag import check_window

__all__ = ["apply_context_parallel"]


def _lasp_mix(attn: LightningAttention, group, chunk_len, mode):
    def mix(q, k, v, cu_seqlens, positions):
        return lasp_lightning_attention(q, k, v, attn.slopes(q.device), cu_seqlens, positions,
                                        chunk_len, group, mode, attn.block_size)
    return mix


def _ring_mix(attn: SoftmaxAttention, group, chunk_len):
    def mix(q, k, v, cu_seqlens, positions):
        return ring_attention(q, k, v, cu_seqlens, positions, chunk_len, group,
                              scale=attn.head_dim ** -0.5)
    return mix


def apply_context_parallel(model, cp_group, lasp_mode: str = "allgather", window_len: int | None = None):
    """Swap the model instance's attention cores for their context-parallel versions (the MoE: see above).

    cp_group: the CP process group (None or size 1 still uses the zigzag layout of 2 chunks);
    lasp_mode: 'allgather' (LASP+) or 'ring' (original LASP, for comparison);
    window_len: tokens per window (stage.seq_len), required; a micro-batch may hold several windows.
    Returns the model.
    """
    if lasp_mode not in LASP_MODES:
        raise ValueError(f"lasp.mode={lasp_mode!r} must be one of {'|'.join(LASP_MODES)}")
    if window_len is None:
        raise ValueError("context parallel: window_len (stage.seq_len) is required to place the zigzag chunks")
    chunk_len = check_window(window_len, group_size(cp_group))
    for module in model.modules():
        if isinstance(module, LightningAttention):
            module.mix = _lasp_mix(module, cp_group, chunk_len, lasp_mode)
        elif isinstance(module, SoftmaxAttention):
            module.mix = _ring_mix(module, cp_group, chunk_len)
    return model
