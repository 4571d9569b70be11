"""Flatten a list of packed windows into one packed batch."""

from __future__ import annotations

import torch

from data.packing import IGNORE_INDEX


def collate_windows(windows: list[dict]) -> dict:
    """B windows -> input_ids [B*S], labels [B*S], cu_seqlens int32 [N+1], num_tokens, max_seqlen.

    Window edges are segment edges (a document cut by one already starts a fresh segment).
    num_tokens counts the labels that enter the loss (label != -100).
    """
    if not windows:
        raise ValueError("collate_windows: no windows to collate")
    input_ids = torch.cat([w["input_ids"] for w in windows])
    labels = torch.cat([w["labels"] for w in windows])
    edges, base = [0], 0
    for w in windows:
        edges += (w["cu_seqlens"][1:].to(torch.int64) + base).tolist()
        base += w["input_ids"].numel()
    cu_seqlens = torch.tensor(edges, dtype=torch.int32)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "cu_seqlens": cu_seqlens,
        "num_tokens": int((labels != IGNORE_INDEX).sum()),
        "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    }
