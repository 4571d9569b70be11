"""Pure-PyTorch lightning attention: the CPU path and the ground truth for the Triton kernel.

Per head h with decay lambda_h = exp(-slope_h) (docs/architecture.md, 'The model'):
    S_t = lambda_h * S_{t-1} + k_t^T v_t        (state d_k x d_v, fp32 or wider)
    o_t = q_t S_t                                (no 1/sqrt(d) scale)
The state resets to `initial_state[n]` (zero when None) at the start of every
document n of the packed sequence (`cu_seqlens`).

Shapes: q, k [T, H, d_k], v [T, H, d_v], slope [H], cu_seqlens [N+1] (int, cu[0] = 0,
cu[-1] = T, None = one document), initial_state [N, H, d_k, d_v].
Both functions return (o [T, H, d_v] in q.dtype, final_state [N, H, d_k, d_v] or None).
final_state is fp32 (fp64 when the inputs are fp64).

Two versions, both differentiable by autograd:
- `lightning_attention_naive`: the token-by-token recurrence; slow, obviously right.
- `lightning_attention_chunked`: the block form, vectorised over all blocks of all
  documents, with a log-depth scan carrying the state from block to block.
"""

from __future__ import annotations

import itertools

import torch

from kernels.cu_seqlens import checked_cu_seqlens

__all__ = ["check_lightning_inputs", "lightning_attention_chunked", "lightning_attention_naive"]


def check_lightning_inputs(q, k, v, slope, cu_seqlens, initial_state) -> list[int]:
    """Validate the arguments shared by every lightning attention entry; return cu_seqlens as a list."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [T, H, d] tensor, got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    T, H, d_k = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != (T, H):
        raise ValueError(f"v must be [T={T}, H={H}, d_v], got {tuple(v.shape)}")
    if not isinstance(slope, torch.Tensor) or slope.shape != (H,) or not slope.is_floating_point():
        shape = tuple(slope.shape) if isinstance(slope, torch.Tensor) else type(slope).__name__
        raise ValueError(f"slope must be a floating-point [H={H}] tensor, got {shape}")

    if cu_seqlens is None:
        cu = [0, T]
    else:
        cu = checked_cu_seqlens("cu_seqlens", cu_seqlens, T, total_name="T=")

    if initial_state is not None:
        want = (len(cu) - 1, H, d_k, v.shape[2])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            shape = (
                tuple(initial_state.shape)
                if isinstance(initial_state, torch.Tensor)
                else type(initial_state).__name__
            )
            raise ValueError(f"initial_state must be [N, H, d_k, d_v] = {want}, got {shape}")
    return cu


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # State and accumulation are at least fp32 (fp64 inputs stay fp64 for exact tests).
    return torch.promote_types(dtype, torch.float32)


def lightning_attention_naive(q, k, v, slope, cu_seqlens=None, initial_state=None, output_final_state=False):
    """Token-by-token recurrence. For tests only: a Python loop over every token."""
    cu = check_lightning_inputs(q, k, v, slope, cu_seqlens, initial_state)
    ct = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    decay = torch.exp(-slope.to(device=q.device, dtype=ct))[:, None, None]  # [H, 1, 1]
    H, d_k, d_v = q.shape[1], q.shape[2], v.shape[2]

    outputs, finals = [], []
    for n, (start, end) in enumerate(itertools.pairwise(cu)):
        if initial_state is None:
            state = q.new_zeros(H, d_k, d_v, dtype=ct)
        else:
            state = initial_state[n].to(ct)
        for t in range(start, end):
            state = decay * state + kc[t][:, :, None] * vc[t][:, None, :]  # outer product k_t^T v_t
            outputs.append(torch.einsum("hk,hkv->hv", qc[t], state))
        finals.append(state)

    o = torch.stack(outputs).to(q.dtype) if outputs else q.new_zeros(0, H, d_v)
    final_state = torch.stack(finals).to(ct) if output_final_state else None
    return o, final_state


def _inclusive_decay_scan(a, c):
    """E_b = a_b * E_{b-1} + c_b over the block axis, E_{-1} = 0, in log2(NB) out-of-place steps.

    a: [NB, H] per-block decay of the incoming state (0 where a document starts),
    c: [NB, H, d_k, d_v] per-block contribution. Hillis-Steele scan; out-of-place for autograd.
    """
    offset = 1
    while offset < a.shape[0]:
        c = torch.cat([c[:offset], c[offset:] + a[offset:, :, None, None] * c[:-offset]])
        a = torch.cat([a[:offset], a[offset:] * a[:-offset]])
        offset *= 2
    return c


def _block_size_for(lengths: list[int], block_size: int) -> int:
    """Shrink the block (the result does not depend on it) while padding would more than double the work.

    Every document is padded to whole blocks, so many short documents would otherwise waste most
    of each block; 16 keeps the per-block matmuls from degenerating into per-token loops.
    """
    total = max(sum(lengths), 1)
    while block_size >= 32 and sum(-(-length // block_size) * block_size for length in lengths) > 2 * total:
        block_size //= 2
    return block_size


def lightning_attention_chunked(
    q, k, v, slope, cu_seqlens=None, initial_state=None, output_final_state=False, block_size=64
):
    """The block form (docs/architecture.md, 'The model') with fp32 (or wider) state, vectorised over all documents.

    Each document is zero-padded at its end to a multiple of `block_size`, so every block
    belongs to exactly one document. Per block b (positions j = 0..B-1, L_b valid of them):
        O     = [(Q K^T) * D] V + (Q * lambda^(j+1)) S_b
        S_out = lambda^L_b S_b + (K * lambda^(L_b-1-j))^T V
    Using the true length L_b in the state update makes the padded tail of a document's last
    block invisible: its final state is exactly the state at its last real token.
    The chain S_b -> S_out -> S_{b+1} is a linear recurrence, solved by a log-depth scan.
    """
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    cu = check_lightning_inputs(q, k, v, slope, cu_seqlens, initial_state)
    device, ct = q.device, _compute_dtype(q.dtype)
    T, H, d_k = q.shape
    d_v = v.shape[2]
    N = len(cu) - 1

    # ---- layout: document n occupies blocks [first_block[n], first_block[n] + nblocks[n]) ----
    lengths = [end - start for start, end in itertools.pairwise(cu)]
    B = _block_size_for(lengths, block_size)
    nblocks = [(length + B - 1) // B for length in lengths]
    first_block = [0, *itertools.accumulate(nblocks)][:-1]
    NB = sum(nblocks)
    if NB == 0:  # every document is empty
        final = None
        if output_final_state:
            final = (
                initial_state.to(ct) if initial_state is not None else q.new_zeros(N, H, d_k, d_v, dtype=ct)
            )
        return q.new_zeros(0, H, d_v), final

    lengths_t = torch.tensor(lengths, device=device)
    first_block_t = torch.tensor(first_block, device=device)
    nblocks_t = torch.tensor(nblocks, device=device)
    doc_of_block = torch.repeat_interleave(torch.arange(N, device=device), nblocks_t)  # [NB]
    block_in_doc = torch.arange(NB, device=device) - first_block_t[doc_of_block]
    valid_in_block = (lengths_t[doc_of_block] - block_in_doc * B).clamp(max=B)  # L_b in 1..B
    is_first_block = block_in_doc == 0

    # Padded position of every real token: its document's first padded slot + its offset.
    doc_of_token = torch.repeat_interleave(torch.arange(N, device=device), lengths_t)
    cu_t = torch.tensor(cu, device=device)
    token_slot = first_block_t[doc_of_token] * B + torch.arange(T, device=device) - cu_t[doc_of_token]

    def to_blocks(x):  # [T, H, e] -> [NB, H, B, e], zeros in the padding
        padded = x.new_zeros(NB * B, H, x.shape[2]).index_copy(0, token_slot, x)
        return padded.view(NB, B, H, x.shape[2]).transpose(1, 2)

    Q, K, V = to_blocks(q.to(ct)), to_blocks(k.to(ct)), to_blocks(v.to(ct))

    # ---- decays, as exp(-slope * n) for accuracy ----
    s = slope.to(device=device, dtype=ct)
    j = torch.arange(B, device=device)
    gap = j[:, None] - j[None, :]  # t - s
    D = torch.exp(-s[:, None, None] * gap.clamp(min=0)) * (gap >= 0)  # [H, B, B]
    q_decay = torch.exp(-s[:, None] * (j + 1))  # [H, B]
    k_power = valid_in_block[:, None] - 1 - j  # [NB, B]: L_b - 1 - j, negative on padding
    k_decay = torch.exp(-s[None, :, None] * k_power.clamp(min=0)[:, None, :]) * (k_power >= 0)[:, None, :]
    block_decay = torch.exp(-s[None, :] * valid_in_block[:, None])  # [NB, H]: lambda^L_b

    # ---- state entering each block ----
    local_state = torch.einsum("nhjk,nhjv->nhkv", K * k_decay[..., None], V)  # [NB, H, d_k, d_v]
    if initial_state is not None:
        init_of_block = initial_state.to(ct)[doc_of_block]  # [NB, H, d_k, d_v]
        first = is_first_block[:, None, None, None]
        local_state = local_state + torch.where(first, block_decay[:, :, None, None] * init_of_block, 0.0)
    carry = torch.where(is_first_block[:, None], 0.0, block_decay)  # a document start cuts the chain
    state_after = _inclusive_decay_scan(carry, local_state)  # [NB, H, d_k, d_v]
    state_before = torch.cat([state_after.new_zeros(1, H, d_k, d_v), state_after[:-1]])
    if initial_state is not None:
        state_before = torch.where(is_first_block[:, None, None, None], init_of_block, state_before)
    else:
        state_before = torch.where(is_first_block[:, None, None, None], 0.0, state_before)

    # ---- outputs ----
    scores = torch.einsum("nhik,nhjk->nhij", Q, K) * D
    O = scores @ V + (Q * q_decay[..., None]) @ state_before  # [NB, H, B, d_v]
    o = O.transpose(1, 2).reshape(NB * B, H, d_v)[token_slot].to(q.dtype)

    final_state = None
    if output_final_state:
        last_block = (first_block_t + nblocks_t - 1).clamp(min=0)
        final_state = state_after[last_block]
        empty = (lengths_t == 0)[:, None, None, None]  # an empty document keeps its initial state
        fallback = initial_state.to(ct) if initial_state is not None else torch.zeros_like(final_state)
        final_state = torch.where(empty, fallback, final_state)
    return o, final_state
