"""Attention kernels and their pure-PyTorch references (docs/architecture.md, 'The model')."""

from kernels.lightning_attention import lightning_attention
from kernels.lightning_reference import lightning_attention_chunked, lightning_attention_naive
from kernels.softmax_attention import softmax_attention_varlen, softmax_attention_varlen_reference

__all__ = [
    "lightning_attention",
    "lightning_attention_chunked",
    "lightning_attention_naive",
    "softmax_attention_varlen",
    "softmax_attention_varlen_reference",
]
