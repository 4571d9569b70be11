"""The zigzag token layout of context parallelism (docs/architecture.md, 'Parallel layouts').

A packed window of T tokens (global `cu_seqlens`) is cut into 2*CP chunks of C = T / (2*CP) tokens;
CP rank r holds chunks r and 2*CP-1-r, in that order, so every rank gets the same causal work.
Documents cross chunk and rank boundaries freely; nothing is padded.

Local tensors of a rank are [chunk r | chunk 2*CP-1-r] (one window) or B such pairs one after the
other (a micro-batch of B windows). What the layers see on a rank:
- `positions`: the GLOBAL position of each local token within its document (RoPE and document identity);
- local `cu_seqlens`: the local segments, cut at every chunk edge and at every document start, so that
  a segment never spans two chunks and every segment start inside a chunk is a document start.
`describe_local_chunks` turns these two back into the per-chunk facts LASP+ and ring attention need.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from model.rope import positions_from_cu_seqlens

__all__ = [
    "LocalChunk",
    "check_window",
    "chunk_owner",
    "describe_local_chunks",
    "local_cu_seqlens",
    "shard_batch",
    "shard_window",
    "unshard",
    "zigzag_chunk_ids",
    "zigzag_token_index",
]


def check_window(window_len: int, cp_size: int) -> int:
    """The chunk length C; one-line ValueError when the window does not split into 2*CP chunks."""
    if cp_size < 1:
        raise ValueError(f"context parallel: context_parallel_size={cp_size} must be >= 1")
    if window_len <= 0 or window_len % (2 * cp_size):
        raise ValueError(f"context parallel: window length stage.seq_len={window_len} must be a positive multiple "
                         f"of 2 * context_parallel_size = {2 * cp_size} (zigzag layout)")
    return window_len // (2 * cp_size)


def zigzag_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunks rank `cp_rank` holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def chunk_owner(chunk: int, cp_size: int) -> tuple[int, int]:
    """(rank, local slot 0|1) of a window's chunk."""
    return (chunk, 0) if chunk < cp_size else (2 * cp_size - 1 - chunk, 1)


def zigzag_token_index(window_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Window indices [2C] of the tokens rank `cp_rank` holds, in local order."""
    C = check_window(window_len, cp_size)
    return torch.cat([torch.arange(c * C, (c + 1) * C, device=device) for c in zigzag_chunk_ids(cp_rank, cp_size)])


def local_cu_seqlens(cu_seqlens: torch.Tensor, window_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Local segments int32 [n+1] of a rank: cut at its chunk edges and at every document start inside them."""
    C = check_window(window_len, cp_size)
    starts = sorted({int(s) for s in cu_seqlens.tolist()})
    edges = [0]
    for slot, c in enumerate(zigzag_chunk_ids(cp_rank, cp_size)):
        inner = [s - c * C for s in starts if c * C < s < (c + 1) * C]
        edges += [slot * C + s for s in inner] + [(slot + 1) * C]
    return torch.tensor(edges, dtype=torch.int32, device=cu_seqlens.device)


def shard_window(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int,
                 labels: torch.Tensor | None = None) -> dict:
    """This rank's part of one window: input_ids, labels, positions (global, within document), cu_seqlens (local)."""
    T = input_ids.shape[0]
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
        raise ValueError(f"context parallel: cu_seqlens must run from 0 to the window length {T}")
    index = zigzag_token_index(T, cp_rank, cp_size, device=input_ids.device)
    positions = positions_from_cu_seqlens(cu_seqlens.to(input_ids.device), T)
    out = {
        "input_ids": input_ids[index],
        "positions": positions[index],
        "cu_seqlens": local_cu_seqlens(cu_seqlens, T, cp_rank, cp_size),
    }
    if labels is not None:
        out["labels"] = labels[index]
    return out


def shard_batch(batch: dict, window_len: int, cp_rank: int, cp_size: int) -> dict:
    """This rank's part of a collated micro-batch of B windows of `window_len` tokens (data.collate_windows).

    Returns input_ids, labels, positions, cu_seqlens (local) and num_tokens: the loss-token count of the WHOLE
    micro-batch (unchanged), so that sum-of-local-CE / num_tokens summed over CP is the window's mean loss.
    """
    check_window(window_len, cp_size)
    total = batch["input_ids"].shape[0]
    if total % window_len:
        raise ValueError(f"context parallel: micro-batch of {total} tokens is not whole windows of "
                         f"stage.seq_len={window_len}")
    cu = batch["cu_seqlens"].tolist()
    parts = []
    for b in range(total // window_len):
        lo, hi = b * window_len, (b + 1) * window_len
        window_cu = torch.tensor([lo] + [s for s in cu if lo < s < hi] + [hi]) - lo
        parts.append(shard_window(batch["input_ids"][lo:hi], window_cu, cp_rank, cp_size,
                                  batch["labels"][lo:hi] if "labels" in batch else None))
    local_len = parts[0]["input_ids"].shape[0]
    out = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "cu_seqlens"}
    edges = [0] + [b * local_len + int(e) for b, p in enumerate(parts) for e in p["cu_seqlens"][1:]]
    out["cu_seqlens"] = torch.tensor(edges, dtype=torch.int32, device=batch["cu_seqlens"].device)
    if "labels" in batch:
        out["num_tokens"] = batch.get("num_tokens", int((batch["labels"] != -100).sum()))
    return out


def unshard(local_parts: list[torch.Tensor], window_len: int) -> torch.Tensor:
    """Inverse of the sharding: every rank's local tensor (dim 0 = B*2C tokens) -> [B*window_len, ...]."""
    cp_size = len(local_parts)
    C = check_window(window_len, cp_size)
    n_windows = local_parts[0].shape[0] // (2 * C)
    out = local_parts[0].new_empty((n_windows * window_len, *local_parts[0].shape[1:]))
    for rank, part in enumerate(local_parts):
        for b in range(n_windows):
            for slot, c in enumerate(zigzag_chunk_ids(rank, cp_size)):
                out[b * window_len + c * C: b * window_len + (c + 1) * C] = part[(2 * b + slot) * C: (2 * b + slot + 1) * C]
    return out


@dataclass(frozen=True)
class LocalChunk:
    """One chunk a rank holds, as LASP+ and ring attention see it."""

    window: int  # window of the micro-batch
    chunk: int  # chunk index within its window, 0 .. 2*CP-1 (sequence order)
    start: int  # offset of its first token in the local tensors
    first_position: int  # position within its document of the first token; 0: a document starts here
    first_segment_len: int  # tokens up to the next document start inside the chunk (or the chunk end)
    last_segment_start: int  # local offset of the last document start inside the chunk (or `start`)
    first_segment: int  # index of its first local segment (row of an initial_state/final_state tensor)
    last_segment: int  # index of its last local segment

    @property
    def has_document_start(self) -> bool:
        return self.first_position == 0 or self.first_segment != self.last_segment


def describe_local_chunks(cu_seqlens: torch.Tensor, positions: torch.Tensor, chunk_len: int, cp_rank: int,
                          cp_size: int) -> list[LocalChunk]:
    """The chunks of the local tokens, checked against the layout contract (module docstring)."""
    L = positions.shape[0]
    if chunk_len <= 0 or L % (2 * chunk_len):
        raise ValueError(f"context parallel: {L} local tokens are not whole zigzag chunk pairs of {chunk_len} "
                         f"tokens (is the window length stage.seq_len = 2 * context_parallel_size * chunk?)")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != L:
        raise ValueError(f"context parallel: local cu_seqlens must run from 0 to {L}, got {cu[0]} .. {cu[-1]}")
    edges = sorted(set(cu))
    starts_pos = positions[torch.tensor(edges[:-1], device=positions.device)].tolist()
    pos_at = dict(zip(edges[:-1], starts_pos))
    seg_of = {}
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        if b > a:
            seg_of[a] = i
    chunks = []
    for i in range(L // chunk_len):
        lo, hi = i * chunk_len, (i + 1) * chunk_len
        if lo not in seg_of:
            raise ValueError(f"context parallel: local cu_seqlens must cut at every chunk edge ({lo} missing)")
        inner = [e for e in edges if lo < e < hi]
        if any(pos_at[e] != 0 for e in inner):
            raise ValueError("context parallel: a local segment inside a chunk starts mid-document; local cu_seqlens "
                             "must cut only at chunk edges and document starts (use parallel.zigzag.shard_batch)")
        window, slot = divmod(i, 2)
        chunks.append(LocalChunk(
            window=window, chunk=zigzag_chunk_ids(cp_rank, cp_size)[slot], start=lo, first_position=pos_at[lo],
            first_segment_len=(inner[0] if inner else hi) - lo, last_segment_start=inner[-1] if inner else lo,
            first_segment=seg_of[lo], last_segment=seg_of[inner[-1]] if inner else seg_of[lo],
        ))
    return chunks
