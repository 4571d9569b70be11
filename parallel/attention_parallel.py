"""The attention layers on a TP x CP layout: one in-place conversion per layer carries both dimensions.

- TP (`tp_group`, `sequence_parallel`): this rank's heads. Lightning: qkv/gate column-parallel (rows are
  [q_h | k_h | v_h] per head), the RMSNorm over all heads exact, out_proj row-parallel, this rank's decay slopes.
  Softmax: this rank's query heads and the KV heads they read (num_kv_heads % tp == 0 keeps GQA groups local).
  The input enters the TP region and the output leaves it (`parallel.tensor_parallel`).
- CP (`ContextParallel`): the sequence-mixing core `mix` becomes LASP+ (lightning) or varlen ring attention
  (softmax) over the zigzag chunks (`parallel.zigzag`). Everything else in the model is per token except the
  MoE's capacity and aux loss, which must cover the whole window: `parallelize` converts every MoE over the
  TP x CP token group.

Under CP each rank calls the model on its local tokens from `parallel.zigzag.shard_batch`:
    out = model(local["input_ids"], local["cu_seqlens"], local["labels"], positions=local["positions"])
with the global positions within each document given explicitly and `cu_seqlens` the local segments. The
window's loss is `all_reduce(out.loss_sum) / num_tokens`; replicated parameters' gradients are summed over CP
(they sync over DP x CP anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.attention import LightningAttention, SoftmaxAttention

from .collectives import group_rank, group_size
from .lasp import LASP_MODES, lasp_lightning_attention
from .ring_attention import ring_attention
from .tensor_parallel import (
    TensorParallelRMSNorm,
    enter_tp_region,
    exit_tp_region,
    shard_column_parallel,
    shard_row_parallel,
)
from .zigzag import check_window


@dataclass(frozen=True)
class ContextParallel:
    """The CP group and the zigzag chunk length; lasp_mode 'allgather' (LASP+) or 'ring' (original LASP)."""
    group: object
    chunk_len: int
    lasp_mode: str = "allgather"

    @classmethod
    def for_window(cls, group, window_len: int, lasp_mode: str = "allgather") -> ContextParallel:
        """window_len: tokens per window (stage.seq_len); a micro-batch may hold several windows."""
        if lasp_mode not in LASP_MODES:
            raise ValueError(f"lasp.mode={lasp_mode!r} must be one of {'|'.join(LASP_MODES)}")
        return cls(group, check_window(window_len, group_size(group)), lasp_mode)


class _ParallelAttention:
    """Shared by both layer kinds: the TP region around the single-process layer."""

    def _set_layout(self, tp_group, sequence_parallel: bool, cp: ContextParallel | None):
        self.tp_group, self.sequence_parallel, self.cp = tp_group, sequence_parallel, cp

    def forward(self, x, cu_seqlens, positions):  # the single-process layer on this rank's heads
        g, sp = self.tp_group, self.sequence_parallel
        return exit_tp_region(super().forward(enter_tp_region(x, g, sp), cu_seqlens, positions), g, sp)


class ParallelLightningAttention(_ParallelAttention, LightningAttention):
    @classmethod
    def convert(cls, attn: LightningAttention, tp_group, sequence_parallel: bool, cp: ContextParallel | None):
        attn.__class__ = cls
        attn._set_layout(tp_group, sequence_parallel, cp)
        n = group_size(tp_group)
        if n > 1:
            shard_column_parallel(attn.qkv_proj, tp_group)
            shard_column_parallel(attn.output_gate, tp_group)
            shard_row_parallel(attn.out_proj, tp_group)
            TensorParallelRMSNorm.convert(attn.norm, tp_group)
            attn.num_heads //= n
            attn._slopes = attn._slopes.chunk(n)[group_rank(tp_group)].clone()
            attn._slopes_on = {}  # drop per-device copies of the full set
        return attn

    def mix(self, q, k, v, cu_seqlens, positions):
        if self.cp is None:
            return super().mix(q, k, v, cu_seqlens, positions)
        return lasp_lightning_attention(q, k, v, self.slopes(q.device), cu_seqlens, positions, self.cp.chunk_len,
                                        self.cp.group, self.cp.lasp_mode, self.block_size)


class ParallelSoftmaxAttention(_ParallelAttention, SoftmaxAttention):
    @classmethod
    def convert(cls, attn: SoftmaxAttention, tp_group, sequence_parallel: bool, cp: ContextParallel | None):
        attn.__class__ = cls
        attn._set_layout(tp_group, sequence_parallel, cp)
        if group_size(tp_group) > 1:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                shard_column_parallel(proj, tp_group)
            shard_row_parallel(attn.o_proj, tp_group)
        return attn

    def mix(self, q, k, v, cu_seqlens, positions):
        if self.cp is None:
            return super().mix(q, k, v, cu_seqlens, positions)
        return ring_attention(q, k, v, cu_seqlens, positions, self.cp.chunk_len, self.cp.group,
                              scale=self.head_dim ** -0.5)


def parallelize_attention(attn, tp_group, sequence_parallel: bool, cp: ContextParallel | None):
    """Convert one attention layer (either kind) in place; returns it."""
    cls = ParallelLightningAttention if isinstance(attn, LightningAttention) else ParallelSoftmaxAttention
    return cls.convert(attn, tp_group, sequence_parallel, cp)
