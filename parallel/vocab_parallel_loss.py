"""Vocab-parallel LM head + cross-entropy without logits [T, V/n]: the chunked loss of
model.linear_cross_entropy with its per-token statistics combined over the TP group.

Every TP rank holds all tokens' hidden states and its vocabulary rows vocab_start .. vocab_start + V/n of the
head. Per chunk the row maximum is all-reduced (MAX), then the sum of exponentials and the picked logit together
(SUM, one collective). Backward needs no collective: the saved log-sum-exp is already the global one. Shards are
equal, so every rank runs the same chunk sequence and the collectives pair up.
"""

import torch
import torch.distributed as dist

from model.linear_cross_entropy import LinearCrossEntropy

from .collectives import group_size


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, group,
                                        vocab_start: int, ignore_index: int = -100,
                                        chunk_tokens: int | None = None) -> torch.Tensor:
    """The micro-batch's loss_sum (fp32, the same on every rank) from hidden [T, h] and this rank's weight
    shard [V/n, h]. The gradient of hidden is this rank's partial: the caller's region sums it over TP in backward
    (copy_to_group / all_gather), as for any column-parallel projection."""

    def all_reduce(op):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            if group_size(group) > 1:
                dist.all_reduce(x, op=op, group=group)
            return x
        return reduce

    return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_tokens, vocab_start,
                                    all_reduce(dist.ReduceOp.MAX), all_reduce(dist.ReduceOp.SUM))
