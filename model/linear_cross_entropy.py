"""LM head + cross-entropy that never materializes the logits [T, V]: at most one chunk's worth of logits
(chunk_tokens x V elements) exists at a time, in forward and in backward.

Design: forward runs token chunks [chunk, V] and keeps only the per-token log-sum-exp [T] (fp32); backward
recomputes the logits, in vocabulary blocks [T, block] of the same size. Computing the gradients in forward
instead (Liger style) would keep a weight gradient [V, h] alive from forward to backward (fp32: 4.9 GB for
V = 200,064, h = 6,144) and cost backward work in evaluation; recomputing costs one product more (the head runs
about 4/3 as long) and, the saved log-sum-exp being the global one, needs no collective in a vocab-parallel
backward. Vocabulary blocks write each block's weight gradient once and accumulate only the hidden gradient
[T, h]; token chunks would read-modify-write the fp32 weight gradient [V, h] once per chunk instead.

Under autocast the products run in the autocast dtype, as nn.Linear's would, and the softmax statistics in fp32.
torch.amp.custom_fwd/custom_bwd fix one device type when the class is defined; recording the compute dtype in
ctx serves CPU and CUDA alike.
"""

import torch

LOSS_CHUNK_ELEMENTS = 2**27  # logits per chunk: 512 MiB in fp32
STATS_BYTES = 4  # fp32 softmax statistics


def loss_chunk_tokens(vocab_size: int) -> int:
    """Default tokens per chunk for a head (or vocabulary shard) of vocab_size rows."""
    return max(1, LOSS_CHUNK_ELEMENTS // vocab_size)


def head_activation_bytes(num_tokens: int, hidden: int, vocab_local: int, compute_dtype_bytes: int) -> int:
    """Bytes the head keeps for backward plus its transient peak, with default chunks, on CUDA.

    Assumes fp32 hidden and weight (autocast's residual stream and master weights). Kept: hidden in the compute
    dtype [T, h] and the log-sum-exp [T]. Transient: the weight cast to the compute dtype when that is narrower
    than fp32, and one chunk's fp32 logits with, when narrower, their compute-dtype copy. Not counted: the
    gradients returned for hidden and weight (any linear layer's) and the labels (the caller's).
    """
    chunk_elements = min(num_tokens, loss_chunk_tokens(vocab_local)) * vocab_local
    narrow_bytes = compute_dtype_bytes if compute_dtype_bytes < STATS_BYTES else 0
    kept = num_tokens * (hidden * compute_dtype_bytes + STATS_BYTES)
    return kept + vocab_local * hidden * narrow_bytes + chunk_elements * (STATS_BYTES + narrow_bytes)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b as dtype; CUDA writes fp32 products of bf16 inputs directly, without a narrow copy."""
    if a.dtype == dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype, out=out)
    product = (a @ b).to(dtype)
    return product if out is None else out.copy_(product)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulating in acc's dtype (CUDA: in place, no product temporary)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


def _local_targets(labels: torch.Tensor, first_row: int, rows: int, ignore_index: int):
    """Column of each label among weight rows first_row .. first_row + rows, whether it is there, whether
    the token counts at all."""
    local = labels - first_row
    counted = labels != ignore_index
    here = counted & (local >= 0) & (local < rows)
    return local.clamp(0, rows - 1)[:, None], here, counted


def _chunk_loss(h, w, labels, vocab_start, ignore_index, stats_dtype, reduce_max, reduce_sum):
    """Log-sum-exp [chunk] and summed loss of a token chunk; its logits die on return."""
    target, here, counted = _local_targets(labels, vocab_start, w.shape[0], ignore_index)
    logits = _mm(h, w.T, stats_dtype)
    row_max = reduce_max(logits.max(dim=-1).values)
    picked = logits.gather(1, target).squeeze(1) * here
    sum_exp, picked = reduce_sum(torch.stack([logits.sub_(row_max[:, None]).exp_().sum(-1), picked]))
    log_sum_exp = row_max + sum_exp.log()
    return log_sum_exp, torch.where(counted, log_sum_exp - picked, 0.0).sum()


def _block_grad_logits(h, w_block, labels, first_row, ignore_index, log_sum_exp, grad_loss):
    """d loss / d logits [T, block] = grad_loss * (softmax - one_hot(label)) on counted tokens."""
    target, here, counted = _local_targets(labels, first_row, w_block.shape[0], ignore_index)
    probs = _mm(h, w_block.T, log_sum_exp.dtype).sub_(log_sum_exp[:, None]).exp_()
    probs.scatter_add_(1, target, -here[:, None].to(probs.dtype))
    return probs.mul_(counted[:, None] * grad_loss.to(probs.dtype)).to(h.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of logits hidden @ weight.T; reduce_max/reduce_sum combine per-token
    statistics over the vocabulary shards (identity for a whole vocabulary)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_tokens, vocab_start, reduce_max, reduce_sum):
        device, num_tokens = hidden.device.type, hidden.shape[0]
        compute_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                         else torch.promote_types(hidden.dtype, weight.dtype))
        stats_dtype = torch.promote_types(compute_dtype, torch.float32)
        chunk = chunk_tokens or loss_chunk_tokens(weight.shape[0])
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            log_sum_exp = torch.empty(num_tokens, dtype=stats_dtype, device=hidden.device)
            loss_sum = torch.zeros((), dtype=stats_dtype, device=hidden.device)
            for start in range(0, num_tokens, chunk):
                rows = slice(start, start + chunk)
                log_sum_exp[rows], chunk_loss = _chunk_loss(h[rows], w, labels[rows], vocab_start, ignore_index,
                                                            stats_dtype, reduce_max, reduce_sum)
                loss_sum += chunk_loss
        ctx.save_for_backward(h, weight, labels, log_sum_exp)
        ctx.hidden_dtype, ctx.ignore_index, ctx.vocab_start = hidden.dtype, ignore_index, vocab_start
        block_rows = max(1, chunk * weight.shape[0] // max(1, num_tokens))  # the same logits budget
        # Rows of a multiple of 64 keep cuBLAS on its fast kernels (a 16,362-wide bf16 block ran 3x slower).
        ctx.block_rows = block_rows if block_rows < 64 else block_rows - block_rows % 64
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, labels, log_sum_exp = ctx.saved_tensors
        grad_hidden = torch.zeros(h.shape, dtype=torch.promote_types(ctx.hidden_dtype, torch.float32),
                                  device=h.device)
        grad_weight = torch.empty(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(h.dtype)
            for start in range(0, w.shape[0], ctx.block_rows):
                cols = slice(start, start + ctx.block_rows)
                grad_logits = _block_grad_logits(h, w[cols], labels, ctx.vocab_start + start, ctx.ignore_index,
                                                 log_sum_exp, grad_loss)
                _mm(grad_logits.T, h, grad_weight.dtype, out=grad_weight[cols])
                _addmm_(grad_hidden, grad_logits, w[cols])
                del grad_logits  # before the next block's logits exist
        return grad_hidden.to(ctx.hidden_dtype), grad_weight.to(weight.dtype), None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_tokens: int | None = None) -> torch.Tensor:
    """Sum of cross-entropies of logits hidden [T, h] @ weight [V, h].T against labels [T] != ignore_index, in
    fp32 (fp64 for fp64 inputs); chunk_tokens defaults to loss_chunk_tokens(V)."""
    return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_tokens, 0, _identity, _identity)
