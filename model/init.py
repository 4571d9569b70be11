"""Layout-invariant weight initialisation: each element is a function of (seed, parameter name, its index).

A counter-based generator (splitmix64 over the element's flat index in the logical, unsharded tensor, then
Box-Muller in float32) gives every element its own random number, so a rank that holds any rectangular block of a
parameter fills exactly that block: no other element, and no RNG stream for them, is ever produced. The same
seed therefore gives bit-identical logical weights under every parallel layout.

Rules (Xavier normal; DeepNorm's (8N)^-0.25 is the gain of value, output and FFN projections; embedding
normal(0, init_std); 1-D parameters, i.e. norm scales, are ones) are keyed by the parameter's name.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .config import ModelConfig

_CHUNK = 1 << 16  # elements generated at a time: bounds the temporaries (a few MB)
_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA, _M1, _M2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(key: int, counter: torch.Tensor) -> torch.Tensor:
    """splitmix64's output number `counter` of the stream `key` (int64 products wrap, as the algorithm wants)."""
    z = counter * _GAMMA + key
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def standard_normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """N(0, 1) float32 for every element index of the stream `key`: Box-Muller on two 24-bit fields of the
    element's 64-bit number (|z| <= 5.9)."""
    z = _splitmix64(key, index)
    u1 = (_shr(z, 40).float() + 0.5) * 2.0 ** -24
    u2 = (((z >> 8) & 0xFFFFFF).float() + 0.5) * 2.0 ** -24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def stream_key(seed: int, name: str) -> int:
    return _int64(int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little"))


def init_std(cfg: ModelConfig, name: str, shape: tuple) -> float | torch.Tensor | None:
    """The normal std of parameter `name` of logical `shape` (a [rows] tensor when it varies along dim 0),
    or None for a parameter initialised to ones."""
    if len(shape) == 1:
        return None
    beta = (8 * cfg.num_layers) ** -0.25

    def xavier(gain, fan_in, fan_out):
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    if name.endswith("embed_tokens.weight"):
        return cfg.init_std
    if name.endswith(("experts.w_gate", "experts.w_up", "experts.w_down")):  # [E, in, out] per expert
        return xavier(beta, shape[1], shape[2])
    if name.endswith("qkv_proj.weight"):  # rows per head are [q | k | v]: only the value rows get beta
        gains = torch.tensor([1.0, 1.0, beta], dtype=torch.float64).repeat_interleave(cfg.head_dim)
        return gains.repeat(cfg.num_heads) * xavier(1.0, shape[1], cfg.q_dim)
    if name.endswith(("v_proj.weight", "o_proj.weight", "out_proj.weight")):
        return xavier(beta, shape[1], shape[0])
    return xavier(1.0, shape[1], shape[0])


@torch.no_grad()
def init_block_(tensor: torch.Tensor, cfg: ModelConfig, name: str, shape: tuple, offsets: tuple, seed: int):
    """Fill `tensor` (contiguous) with block [offsets, offsets + tensor.shape) of parameter `name` of `shape`."""
    std = init_std(cfg, name, tuple(shape))
    if std is None:
        tensor.fill_(1.0)
        return tensor
    key, flat, device = stream_key(seed, name), tensor.view(-1), tensor.device
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    std = std.to(device) if isinstance(std, torch.Tensor) else std
    # Trailing dims held whole (the usual case): logical index = local index + the first dim's offset.
    contiguous = all(n == g and o == 0 for n, g, o in zip(tensor.shape[1:], shape[1:], offsets[1:]))
    for start in range(0, flat.numel(), _CHUNK):
        local = torch.arange(start, min(start + _CHUNK, flat.numel()), device=device)
        if contiguous:
            index = local + offsets[0] * strides[0]
            row = index.div(strides[0], rounding_mode="floor") if isinstance(std, torch.Tensor) else None
        else:
            index, row = torch.zeros_like(local), None
            for d in reversed(range(len(shape))):  # local flat index -> index in the logical tensor
                local, coord = local.div(tensor.shape[d], rounding_mode="floor"), local % tensor.shape[d]
                index += (coord + offsets[d]) * strides[d]
                row = coord + offsets[d]
        scale = std[row] if isinstance(std, torch.Tensor) else std
        flat[start:start + index.numel()] = (standard_normal(key, index) * scale).to(tensor.dtype)
    return tensor
