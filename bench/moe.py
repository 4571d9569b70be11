"""MoE benchmark (issue 5): expert products and the MoE layer, grouped products against a per-expert loop.

    python bench/moe.py [--tokens 16384,32768] [--tiny]            # one GPU (or CPU with --tiny)
    torchrun --nproc-per-node 2 bench/moe.py --ep 2 [--preset small] [--tiny]   # expert parallel

Single device, MiniMax expert shape (hidden 6144, FFN 9216, 32 experts, top-2), bf16:
1. the bf16 matrix-product ceiling, measured here (square torch.mm);
2. expert products alone (SwiGLU of every routed assignment, forward + backward) on pre-sorted rows:
   F.grouped_mm (model.moe.SwiGLUExperts on CUDA) vs a loop of per-expert products;
3. the whole MoE layer (fp32 router, top-2, permute, experts, combine) forward + backward, both ways.
TFLOP/s count the expert products only: 18 * M * hidden * ffn per step (3 products forward, twice that
backward) for M kept assignments; "peak %" is their share of the measured ceiling.

--ep N (under torchrun): the expert-parallel layer (parallel.moe_parallel) with EP = world / etp, every rank
with its own tokens (skewed per rank with --skew, as different documents are): step time and tokens/s for
G = 1, 2 overlap groups and the drop rate of the global and local routers.

Prints the table last; writes bench/results/moe_<preset>.json (moe_ep<N>_etp<M>_<preset>.json with --ep) and the same under $OUT when set.
--tiny: small shapes, runs on CPU (fp32, where the loop is the only path) as a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig
from model.moe import MoE, grouped_mm_applies, route_top_k, swiglu_products

SHAPES = {
    "minimax": {"hidden_size": 6144, "ffn_hidden_size": 9216, "num_experts": 32, "top_k": 2},
    "small": {"hidden_size": 1024, "ffn_hidden_size": 1024, "num_experts": 32, "top_k": 2},
    "tiny": {"hidden_size": 64, "ffn_hidden_size": 128, "num_experts": 8, "top_k": 2},
}


def log(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def time_ms(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def matmul_peak_tflops(device, dtype, n: int, warmup: int, iters: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b), device, warmup, iters)
    return 2 * n ** 3 / ms / 1e9


def build_moe(shape: dict, device, dtype, capacity_factor, seed=0) -> MoE:
    cfg = ModelConfig(vocab_size=128, num_layers=1, num_heads=1, head_dim=16, num_kv_heads=1,
                      capacity_factor=capacity_factor, **shape)
    torch.manual_seed(seed)
    moe = MoE(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        moe.gate.weight.normal_(0, cfg.hidden_size ** -0.5)
        for w in moe.experts.parameters():
            w.normal_(0, 0.02)
    return moe


def bench_single(args, shape, device, dtype, peak) -> list[dict]:
    rows = []
    moe = build_moe(shape, device, dtype, args.capacity_factor)
    h, f = shape["hidden_size"], shape["ffn_hidden_size"]
    paths = ["grouped", "loop"] if grouped_mm_applies(torch.empty(0, device=device, dtype=dtype)) else ["loop"]
    for T in args.tokens:
        x = torch.randn(T, h, device=device, dtype=dtype)
        routing = route_top_k(moe.gate(x), shape["top_k"])
        counts = routing.tokens_per_expert
        M = int(counts.sum())
        x_sorted = torch.randn(M, h, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, h, device=device, dtype=dtype)
        x_layer = x.clone().requires_grad_(True)
        dy_layer = torch.randn_like(x)
        for path in paths:
            weights = (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down)
            products = functools.partial(swiglu_products, w_gate=weights[0], w_up=weights[1], w_down=weights[2],
                                         grouped=path == "grouped")

            def experts_step(products=products, x_sorted=x_sorted, counts=counts, dy=dy):
                moe.zero_grad(set_to_none=True)
                products(x_sorted, counts).backward(dy)

            ms = time_ms(experts_step, device, args.warmup, args.iters)
            flops = 18 * M * h * f
            rows.append({"bench": "expert products", "path": path, "tokens": T, "assignments": M, "ms": ms,
                         "tflops": flops / ms / 1e9, "peak_pct": 100 * flops / ms / 1e9 / peak})
            moe.experts.forward = products  # the layer runs the same path

            def layer_step(x_layer=x_layer, dy_layer=dy_layer):
                moe.zero_grad(set_to_none=True)
                moe(x_layer).backward(dy_layer)

            ms = time_ms(layer_step, device, args.warmup, args.iters)
            kept = M - int(moe.last_stats["dropped"])
            flops = 18 * kept * h * f
            rows.append({"bench": "MoE layer", "path": path, "tokens": T, "assignments": kept, "ms": ms,
                         "tokens_per_s": T / ms * 1e3, "tflops": flops / ms / 1e9,
                         "peak_pct": 100 * flops / ms / 1e9 / peak,
                         "drop_rate": float(moe.last_stats["dropped"]) / M})
            moe.experts.__dict__.pop("forward", None)
            log(json.dumps(rows[-2]), "\n", json.dumps(rows[-1]))
    return rows


def bench_expert_parallel(args, shape, device, dtype) -> list[dict]:
    from parallel.moe_parallel import ExpertParallelMoE

    world, rank = dist.get_world_size(), dist.get_rank()
    etp = args.etp
    ep = world // etp
    if ep != args.ep or world % etp:
        raise ValueError(f"--ep={args.ep} x --etp={etp} must equal the world size {world}")
    # MoE parallel folding with EDP = 1: rank = etp_idx + etp * ep_idx.
    etp_groups = [dist.new_group([j * etp + q for q in range(etp)]) for j in range(ep)] if etp > 1 else [None] * ep
    ep_groups = [dist.new_group([j * etp + q for j in range(ep)]) for q in range(etp)]
    etp_group, ep_group = etp_groups[rank // etp], ep_groups[rank % etp]
    full = build_moe(shape, device, dtype, args.capacity_factor)
    T, h = args.tokens[0], shape["hidden_size"]
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)
    # Per-rank skew: every rank's tokens lean towards a direction of its own, like different documents do.
    x = torch.randn(T, h, generator=g) + args.skew * torch.randn(1, h, generator=g)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(T, h, generator=g).to(device=device, dtype=dtype)
    rows = []
    for mode in ("global", "local"):
        for groups in (1, 2):
            layer = ExpertParallelMoE.convert(copy.deepcopy(full), ep_group, etp_group, router_mode=mode, overlap_groups=groups)

            def step(layer=layer):
                layer.zero_grad(set_to_none=True)
                layer(x).backward(dy)

            ms = torch.tensor(time_ms(step, device, args.warmup, args.iters), dtype=torch.float64, device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            s = layer.last_stats
            rows.append({"bench": f"EP layer ep={ep} etp={etp}", "router": mode, "overlap_groups": groups,
                         "tokens_per_rank": T, "ms": float(ms), "tokens_per_s": world * T / float(ms) * 1e3,
                         "drop_rate": float(s["drop_rate"]), "load_share_max": float(s["load_share_max"]),
                         "load_share_min": float(s["load_share_min"])})
            log(json.dumps(rows[-1]))
    return rows


def print_table(rows: list[dict]) -> None:
    keys = [k for k in ("bench", "path", "router", "overlap_groups", "tokens", "tokens_per_rank", "assignments",
                        "ms", "tokens_per_s", "tflops", "peak_pct", "drop_rate", "load_share_max") if
            any(k in r for r in rows)]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    log("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        log("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU (fp32): a smoke test")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (per rank with --ep)")
    ap.add_argument("--capacity-factor", type=float, default=None, help="token drop (default: none)")
    ap.add_argument("--ep", type=int, default=0, help="expert-parallel run under torchrun with this EP size")
    ap.add_argument("--etp", type=int, default=1)
    ap.add_argument("--preset", default=None, choices=sorted(SHAPES), help="expert shape (default minimax)")
    ap.add_argument("--skew", type=float, default=1.0, help="--ep: strength of each rank's own token direction")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    preset = args.preset or ("tiny" if args.tiny else "minimax")
    shape = SHAPES[preset]
    dtype = torch.bfloat16 if cuda else torch.float32
    default_tokens = "256" if args.tiny else ("8192" if args.ep else "16384,32768")
    args.tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    result = {"preset": preset, "shape": shape, "dtype": str(dtype), "capacity_factor": args.capacity_factor,
              "torch": torch.__version__}
    if args.ep:
        if args.ep > 1 and args.capacity_factor is None:
            args.capacity_factor = 2.0  # drop rates are the point of the comparison
            result["capacity_factor"] = 2.0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        result.update(device=torch.cuda.get_device_name(device) if cuda else "cpu", world=dist.get_world_size(),
                      skew=args.skew)
        rows = bench_expert_parallel(args, shape, device, dtype)
        name = f"moe_ep{args.ep}_etp{args.etp}_{preset}.json"
    else:
        device = torch.device("cuda" if cuda else "cpu")
        peak = matmul_peak_tflops(device, dtype, 256 if args.tiny else 8192, args.warmup, args.iters)
        log(f"measured {dtype} matmul ceiling: {peak:.1f} TFLOP/s")
        result.update(device=torch.cuda.get_device_name(device) if cuda else "cpu", matmul_peak_tflops=peak)
        rows = bench_single(args, shape, device, dtype, peak)
        name = f"moe_{preset}.json"
    result["rows"] = rows
    if not dist.is_initialized() or dist.get_rank() == 0:
        text = json.dumps(result, indent=1)
        out_dir = ROOT / "bench" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], name).write_text(text)
        if "matmul_peak_tflops" in result:
            log(f"\n{result['device']}: {dtype} matmul ceiling {result['matmul_peak_tflops']:.1f} TFLOP/s")
        print_table(rows)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
