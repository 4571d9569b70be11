"""Activation memory per rank: the bytes autograd saves for backward, per layer kind, from the config alone.

`activation_bytes` is plain arithmetic on `ModelConfig` and the parallel sizes (no model, no allocation), so the
planner can ask it about any layout in microseconds. It counts what `torch.autograd.graph.saved_tensors_hooks`
sees for one micro-batch, each storage once, parameters excluded: every tensor named below is one the code saves
(tests/test_activation_memory.py measures them). Not counted: per-document index tensors (a few bytes per
document), the CPU RNG state a checkpointed layer keeps (5 KB per layer), transients of the backward
(except the LM head's, reported apart).

Dtypes: under bf16 autocast matrix products give bf16; norm statistics, the router, the lightning state and flash
attention's log-sum-exp stay fp32 (the PyTorch reference attentions get bf16 products, and softmax, from autocast). The residual stream has the parameters' dtype: the trainer keeps bf16 parameters under
bf16 autocast (embedding, norms and residual adds in bf16), while fp32 parameters under autocast keep it fp32 and
then every linear layer saves its own bf16 copy of its input and of its weight.

Kernels: device_type="cpu" is the PyTorch reference of both attentions and the per-expert loop (what the CPU
tests measure); "cuda" is the Triton lightning kernel and, in bf16, varlen flash attention and grouped expert
products (the same saved bytes as the loop), each where the runtime would pick it.

Assumptions: one document per window (documents only change a few index tensors and the reference kernel's
padding); no token drop, and every rank's experts get an even share of the assignments (exact for the mean over
the expert-parallel ranks; single ranks vary with the routing); under CP, a rank that does not hold the first
chunk of a window (rank 0 saves a little less).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kernels.lightning_attention import SUPPORTED_HEAD_DIMS
from kernels.lightning_reference import _block_size_for
from kernels.softmax_attention import _varlen_attn_api
from model.config import ModelConfig
from model.linear_cross_entropy import head_activation_bytes

FP32, INT64, BOOL = 4, 8, 1
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class RankShape:
    """What one rank holds of a micro-batch and of every layer."""

    cfg: ModelConfig
    tokens_residual: int  # residual stream tokens (CP splits them; SP splits them again over TP)
    tokens_attention: int  # tokens inside attention and the LM head (CP-split, all of them under TP)
    tokens_moe: int  # tokens this rank routes (TP x CP split)
    windows: int
    tp: int
    cp: int
    ep: int
    etp: int
    compute: int  # bytes of a matrix product's output
    residual: int  # bytes of the residual stream (the parameters' dtype)
    device_type: str

    @property
    def autocast_copies(self) -> bool:
        """fp32 parameters under bf16 autocast: linear layers save bf16 copies of input and weight."""
        return self.compute < self.residual

    @property
    def heads(self) -> int:
        return self.cfg.num_heads // self.tp

    @property
    def q_dim(self) -> int:
        return self.heads * self.cfg.head_dim

    @property
    def kv_dim(self) -> int:
        return self.cfg.num_kv_heads // self.tp * self.cfg.head_dim

    @property
    def segments(self) -> list[int]:
        """Lengths of the documents the attention kernels see: whole windows, or the two CP chunks of each."""
        pieces = self.windows * (2 if self.cp > 1 else 1)
        return [self.tokens_attention // pieces] * pieces


def rms_norm_bytes(tokens: int, dim: int, x_bytes: int) -> int:
    """x in fp32 (the input itself when fp32), 1/rms [tokens, 1] and the normalised x in x's dtype."""
    return tokens * (dim * FP32 + FP32 + dim * x_bytes)


def linear_inputs_bytes(r: RankShape, tokens: int, dim: int, consumers: int) -> int:
    """The input that `consumers` linear layers share: one storage, or one autocast bf16 copy each."""
    if r.autocast_copies:
        return consumers * tokens * dim * r.compute
    return tokens * dim * r.residual


def weight_copies_bytes(r: RankShape, elements: int) -> int:
    """Autocast's bf16 copies of fp32 weights, saved by the products that use them."""
    return elements * r.compute if r.autocast_copies else 0


def lightning_core_bytes(r: RankShape) -> int:
    """What the lightning kernel saves (the Triton path on CUDA where it applies, the chunked reference else)."""
    T, H, d = r.tokens_attention, r.heads, r.cfg.head_dim
    if r.device_type == "cuda" and _triton_applies(r):
        from kernels.lightning_triton import TUNING, _segment_size

        segment = TUNING["segment"] or _segment_size(T, H, TUNING["chunk"])
        n_segments = sum(math.ceil(n / segment) for n in r.segments)
        # contiguous copies of q, k, v (views of one qkv tensor), the slopes, one fp32 state per segment
        return 3 * T * H * d * r.compute + H * FP32 + n_segments * H * d * d * FP32
    block = _block_size_for(r.segments, r.cfg.lightning_block_size)
    n_blocks = sum(math.ceil(n / block) for n in r.segments)
    scan_steps = math.ceil(math.log2(n_blocks)) if n_blocks > 1 else 0
    # Operands of the four block products (autocast makes them bf16 copies despite the fp32 state). Six are
    # [block, d]; in fp32 with one block or one head, two of them are the same view of the padded v.
    block_d = 5 if r.compute == FP32 and (n_blocks == 1 or H == 1) else 6
    per_block_head = (block * FP32  # key decays
                      + (block_d * block * d + block * block + d * d) * r.compute
                      + scan_steps * FP32)  # the state scan's decay factors
    return (T * INT64  # padded slot of every token
            + 3 * T * H * d * FP32  # q, k, v in fp32, sources of the padding copies
            + n_blocks * (H * per_block_head + BOOL)
            + H * block * (block + 1) * FP32)  # intra-block and query decays


def _triton_applies(r: RankShape) -> bool:
    """kernels.lightning_attention's choice: Triton where it imports and supports the head dim (and every dtype
    used here)."""
    try:
        import kernels.lightning_triton  # noqa: F401
    except ImportError:
        return False
    return r.cfg.head_dim in SUPPORTED_HEAD_DIMS


def lightning_bytes(r: RankShape) -> int:
    """Input norm + lightning attention block of one layer."""
    T, q, h = r.tokens_attention, r.q_dim, r.cfg.hidden_size
    total = (rms_norm_bytes(r.tokens_residual, h, r.residual)
             + linear_inputs_bytes(r, T, h, consumers=2)  # qkv_proj and output_gate
             + T * 3 * q * r.compute  # silu input
             + lightning_core_bytes(r)
             + rms_norm_bytes(T, q, r.compute)  # the norm over heads, on the kernel output
             + T * q * (r.compute + r.residual)  # sigmoid(gate) and the normalised output it multiplies
             + T * q * r.compute  # out_proj input
             + weight_copies_bytes(r, 5 * q * h))
    if r.cp > 1:  # LASP+: decayed queries and their factors, one prefix state per chunk
        total += T * (q + r.heads) * r.compute + 2 * r.windows * r.heads * r.cfg.head_dim ** 2 * r.compute
    return total


def softmax_core_bytes(r: RankShape) -> int:
    """What softmax attention saves from its rotated q, k and v on: their copies or themselves, and its output."""
    T, H, d, q, kv = r.tokens_attention, r.heads, r.cfg.head_dim, r.q_dim, r.kv_dim
    if r.cp > 1:  # ring attention: q, k, v, the output (the o_proj input) and its log-sum-exp
        return T * (2 * q + 2 * kv) * r.compute + H * T * FP32
    varlen = _varlen_attn_api() if r.device_type == "cuda" and r.compute < FP32 else None
    if varlen is not None:  # flash attention saves the same; k, v expanded to every head where GQA is not built in
        kv_saved = kv if "enable_gqa" in varlen[2] else q
        return T * (2 * q + 2 * kv_saved) * r.compute + H * T * FP32
    # The reference, per document: fp32 (autocast: bf16) copies of q and of the GQA-expanded k and v, the causal
    # mask, exp(scores) and the probabilities (autocast: bf16 too), per-row flags and sums; then its output.
    per_doc = (3 * n * H * d * r.compute + n * n * BOOL + 2 * H * n * n * r.compute + H * n * (BOOL + r.compute)
               for n in r.segments)
    return sum(per_doc) + T * q * r.compute


def softmax_bytes(r: RankShape) -> int:
    """Input norm + softmax attention block of one layer."""
    T, q, kv, h = r.tokens_attention, r.q_dim, r.kv_dim, r.cfg.hidden_size
    return (rms_norm_bytes(r.tokens_residual, h, r.residual)
            + linear_inputs_bytes(r, T, h, consumers=3)
            + 2 * T * r.cfg.rotary_dim * r.compute  # RoPE cos and sin tables
            + softmax_core_bytes(r)
            + weight_copies_bytes(r, (2 * q + 2 * kv) * h))


def moe_bytes(r: RankShape) -> int:
    """Post-attention norm + MoE block of one layer: router, dispatch, SwiGLU experts, combine."""
    c, h = r.cfg, r.cfg.hidden_size
    T, E = r.tokens_moe, c.num_experts
    rows = c.top_k * T  # this rank's assignments (no drop)
    expert_rows = r.etp * rows  # rows its local experts compute: an even share, gathered over ETP
    ffn = c.ffn_hidden_size // r.etp
    # The router reads the norm output in fp32: the norm's own storage when that is fp32 (without SP under TP
    # the whole replicated one), else an fp32 copy of this rank's tokens and of the router weight.
    router = r.tokens_residual * h * FP32 if r.residual == FP32 else T * h * FP32 + E * h * FP32
    total = (rms_norm_bytes(r.tokens_residual, h, r.residual) + router
             + T * E * FP32 + T * c.top_k * (INT64 + FP32)  # probabilities, top-k indices, gates
             + expert_rows * (h + 4 * ffn) * r.compute  # inputs; gate and up products, silu(gate), their product
             + rows * h * r.residual  # gated outputs, kept by the index_add that sums them per token
             + weight_copies_bytes(r, 3 * E // r.ep * h * ffn))
    if r.ep * r.etp > 1:
        total += (expert_rows * h * r.compute  # expert outputs, kept by the index_copy into the ETP buffer
                  + rows * h * r.residual + rows * r.residual  # outputs back home and their gates, multiplied
                  + (3 * rows + expert_rows) * INT64)  # sort order, token of each row (twice), buffer positions
    else:
        total += rows * h * r.compute + rows * FP32 + 2 * rows * INT64  # outputs and fp32 gates; order, tokens
    if c.capacity_factor is not None:
        total += rows * INT64  # kept assignments
    return total


def embedding_bytes(r: RankShape, recompute: bool) -> int:
    """Token ids (TP: the local ids and the mask of ids outside this rank's rows); with recompute every
    checkpointed layer also keeps the positions."""
    T = r.tokens_attention
    total = T * (INT64 + BOOL) if r.tp > 1 else T * INT64
    return total + (T * INT64 if recompute else 0)


def head_bytes(r: RankShape) -> int:
    """Final norm and the chunked LM head + loss (`model.linear_cross_entropy`, vocab-parallel under TP): it
    keeps the hidden states in the compute dtype (all tokens of the TP group), their log-sum-exp and the labels."""
    T, h = r.tokens_attention, r.cfg.hidden_size
    return rms_norm_bytes(r.tokens_residual, h, r.residual) + T * (h * r.compute + FP32 + INT64)


def head_transient_bytes(r: RankShape) -> int:
    """What the head allocates on top while it runs (the weight in the compute dtype, one chunk of logits: its
    own byte function, less what it keeps) and, at the end of its backward, its weight gradient: accumulated
    over the chunks in fp32 and returned in the parameter dtype (measured on an H200 with bf16 parameters, where
    the fp32 buffer alone is 4.6 GiB at MiniMax-Text-01's vocabulary and width)."""
    T, h, V = r.tokens_attention, r.cfg.hidden_size, r.cfg.vocab_size // r.tp
    running = head_activation_bytes(T, h, V, r.compute) - T * (h * r.compute + FP32)
    weight_grad = V * h * (FP32 + (r.residual if r.residual < FP32 else 0))
    return max(running, weight_grad)


def rank_shape(cfg: ModelConfig, *, tokens: int, micro_batch_size: int = 1, tp: int = 1,
               sequence_parallel: bool = False, cp: int = 1, ep: int = 1, etp: int = 1, compute_dtype: str = "fp32",
               param_dtype: str | None = None, device_type: str = "cuda") -> RankShape:
    """One rank's sizes and dtypes under the layout (see activation_bytes for the arguments)."""
    if compute_dtype not in DTYPE_BYTES or (param_dtype or compute_dtype) not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype={compute_dtype!r}, param_dtype={param_dtype!r}: use 'fp32' or 'bf16'")
    compute, residual = DTYPE_BYTES[compute_dtype], DTYPE_BYTES[param_dtype or compute_dtype]
    if residual < compute:
        raise ValueError("bf16 parameters need bf16 compute (autocast)")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type={device_type!r}: use 'cpu' or 'cuda'")
    if tokens % (micro_batch_size * cp * tp):
        raise ValueError(f"tokens={tokens} do not split into {micro_batch_size} windows over cp={cp} x tp={tp}")
    per_cp = tokens // cp
    sp = sequence_parallel and tp > 1
    return RankShape(cfg, per_cp // tp if sp else per_cp, per_cp, per_cp // tp, micro_batch_size, tp, cp, ep, etp,
                     compute, residual, device_type)


def activation_bytes(cfg: ModelConfig, *, tokens: int, tp: int = 1, sequence_parallel: bool = False, cp: int = 1,
                     ep: int = 1, etp: int = 1, compute_dtype: str = "fp32", recompute: bool = False,
                     device_type: str = "cuda", param_dtype: str | None = None, micro_batch_size: int = 1,
                     layers: Sequence[int] | None = None) -> dict:
    """Bytes saved for backward on one rank for one micro-batch of `tokens` (= micro_batch_size windows).

    param_dtype defaults to compute_dtype (the trainer's rule). `layers` (default: all) selects a pipeline
    stage: the embedding counts when it holds layer 0, the head when it holds the last layer.
    Per kind ("lightning", "softmax", "moe", "embedding", "head"): bytes of one of them. With recompute, a
    decoder layer keeps only its input (booked under its attention kind; "moe" is 0) and backward recreates one
    layer at a time ("recomputed_layer": the largest layer's activations less the input already kept).
    "kept" = "total"; "peak" adds the larger of the recreated layer and the head's transient ("head_transient",
    while everything kept is still alive at the start of backward).
    """
    r = rank_shape(cfg, tokens=tokens, micro_batch_size=micro_batch_size, tp=tp, sequence_parallel=sequence_parallel,
                   cp=cp, ep=ep, etp=etp, compute_dtype=compute_dtype, param_dtype=param_dtype,
                   device_type=device_type)
    layers = list(range(cfg.num_layers)) if layers is None else list(layers)
    full = {"lightning": lightning_bytes(r), "softmax": softmax_bytes(r), "moe": moe_bytes(r),
            "embedding": embedding_bytes(r, recompute), "head": head_bytes(r)}
    counts = {kind: sum(cfg.layer_types[i] == kind for i in layers) for kind in ("lightning", "softmax")}
    counts.update(moe=len(layers), embedding=int(0 in layers), head=int(cfg.num_layers - 1 in layers))
    per_kind = dict(full)
    layer_input = r.tokens_residual * cfg.hidden_size * r.residual
    recomputed = 0
    if recompute:
        per_kind.update(lightning=layer_input, softmax=layer_input, moe=0)
        present = [kind for kind in ("lightning", "softmax") if counts[kind]]
        # the layer's fp32 input is its input norm's saved x, the storage the checkpoint already keeps
        shared = layer_input if r.residual == FP32 else 0
        recomputed = max((full[kind] + full["moe"] - shared for kind in present), default=0)
    kept = sum(per_kind[kind] * n for kind, n in counts.items())
    transient = head_transient_bytes(r) if counts["head"] else 0
    return {**per_kind, "per_layer_kind_counts": counts, "total": kept, "kept": kept,
            "peak": kept + max(recomputed, transient), "recomputed_layer": recomputed, "head_transient": transient}
