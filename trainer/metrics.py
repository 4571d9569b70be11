"""Throughput, TFLOP/s, MFU and memory of a training step."""

from __future__ import annotations

import math
import resource
import sys

import torch

# Dense bf16 peak TFLOP/s per device (no sparsity), matched against torch.cuda.get_device_name().
PEAK_TFLOPS_BF16 = (
    ("GB200", 2450.0), ("B200", 2250.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("V100", 125.0),
)


def peak_tflops(device: torch.device, logging_cfg) -> float:
    """Per-device peak for MFU: `logging.peak_tflops` if set, else by GPU name, else the nominal CPU value."""
    if logging_cfg.peak_tflops:
        return float(logging_cfg.peak_tflops)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS_BF16:
            if key in name:
                return value
        return float("nan")  # unknown GPU: set logging.peak_tflops to get MFU
    return float(logging_cfg.cpu_peak_tflops)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int, peak: float) -> dict:
    """tokens/s over all ranks, model TFLOP/s per device and MFU for one step."""
    seconds = max(seconds, 1e-9)
    tflops = flops_per_token * tokens / seconds / world_size / 1e12
    return {
        "tokens_per_s": tokens / seconds,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak and math.isfinite(peak) else float("nan"),
    }
