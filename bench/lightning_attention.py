"""Lightning attention benchmark (issue 3): Triton kernels vs fla's chunk_simple_gla vs SDPA.

    python bench/lightning_attention.py [--quick] [--no-sweep] [--no-fp32-check]

1. ceilings: device-to-device copy bandwidth and a bf16 matmul rate, measured here;
2. correctness at 16K tokens (packed documents, initial and final state) against the fp64
   chunked reference: relative errors of o, final state, dq, dk, dv, d initial_state
   (bf16, and fp32 unless --no-fp32-check); plus ours vs fla at 4K;
3. timings (median, triton.testing.do_bench): T in {4K, 16K, 64K, 256K} and 64 packed
   documents summing to 64K, H=64, d=128, bf16; forward and forward+backward, tokens/s,
   fla's chunk_simple_gla (g_gamma=-slope, scale=1; skipped when fla is absent) and
   F.scaled_dot_product_attention(is_causal=True) up to 64K;
4. per-kernel times at 64K (achieved GB/s and TFLOP/s) and a segment-size sweep.
Prints the table last; writes bench/results/lightning_attention.json (and $OUT/ when set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import lightning_triton as LT
from kernels import lightning_triton_bwd as BW
from kernels import lightning_triton_fwd as FW
from kernels.lightning_reference import lightning_attention_chunked

H, D = 64, 128
DT = torch.bfloat16


def log(*a):
    print(*a, flush=True)


def minimax_slopes(n_heads, layer=0, n_layers=80):
    h = torch.arange(n_heads, dtype=torch.float64)
    return (2.0 ** (-8.0 * (h + 1) / n_heads) * (1 - layer / (n_layers - 1 + 1e-5) + 1e-5)).float()


def bench_ms(fn, grad_to_none=None):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(
        fn, warmup=max(25, 3 * est), rep=max(100, 12 * est), grad_to_none=grad_to_none, return_mode="median"
    )


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def packed_lengths(total, n_docs, seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), n_docs - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def cu_of(lens, device="cuda"):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


# ---------------------------------------------------------------- fla
def load_fla():
    try:
        import fla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # noqa: BLE001
        log(f"fla not available ({type(err).__name__}: {err}); fla columns skipped")
        return None, None
    # fla keeps its full autotuning space (about 2 minutes of tuning on an H200).
    return chunk_simple_gla, getattr(fla, "__version__", "?")


def unwrap_autotuner(kern):
    """fla wraps its Autotuners in triton.heuristics; reach the object that holds best_config."""
    while kern is not None and not hasattr(kern, "best_config") and hasattr(kern, "fn"):
        kern = kern.fn
    return kern


def fla_call(fla_fn, q, k, v, slope, cu):
    o, _ = fla_fn(q[None], k[None], v[None], g_gamma=-slope, scale=1.0,
                  cu_seqlens=cu.long() if cu is not None else None, output_final_state=False)
    return o[0]


# ---------------------------------------------------------------- ceilings
def ceilings():
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    bw = 2 * x.numel() * 2 / ms / 1e9  # TB/s, read + write
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    tf = 2 * 8192**3 / ms / 1e9
    return {"copy_TBps": bw, "bf16_matmul_TFLOPs": tf}


# ---------------------------------------------------------------- correctness
def check_16k(dtype, n_heads, seed):
    T = 16384
    gen = torch.Generator().manual_seed(seed)
    lens = packed_lengths(T - 3, 20, seed) + [1, 1, 1]
    random.Random(seed).shuffle(lens)
    cu = cu_of(lens)
    q, k = [(torch.randn(T, n_heads, D, generator=gen) * D**-0.5).cuda() for _ in range(2)]
    v = torch.randn(T, n_heads, D, generator=gen).cuda()
    slope = minimax_slopes(n_heads).cuda()
    h0 = (torch.randn(len(lens), n_heads, D, D, generator=gen) * 0.3).cuda()
    do = torch.randn(T, n_heads, D, generator=gen).cuda()
    dht = torch.randn_like(h0)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [h0.clone().requires_grad_()]
    o, ht = LT.lightning_attention_triton(*leaves[:3], slope, cu, leaves[3], True)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), leaves)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    ro, rht = lightning_attention_chunked(*ref[:3], slope.double(), cu, ref[3], True)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rht * dht.double()).sum(), ref)
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    errs = {n: rel(a, b) for n, a, b in zip(names, [o, ht, *grads], [ro, rht, *rgrads])}
    errs["finite"] = bool(all(torch.isfinite(t).all() for t in [o, ht, *grads]))
    return errs


# ---------------------------------------------------------------- timings
def make_inputs(T, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(T, H, D, device="cuda", generator=gen) * D**-0.5).to(DT)
    k = (torch.randn(T, H, D, device="cuda", generator=gen) * D**-0.5).to(DT)
    v = torch.randn(T, H, D, device="cuda", generator=gen).to(DT)
    do = torch.randn(T, H, D, device="cuda", generator=gen).to(DT)
    return q, k, v, do


def time_pair(fn, q, k, v, do):
    """(forward ms, forward+backward ms) of fn(q, k, v) -> o."""
    with torch.no_grad():
        fwd = bench_ms(lambda: fn(q, k, v))
    qg, kg, vg = [x.detach().requires_grad_() for x in (q, k, v)]

    def step():
        torch.autograd.backward(fn(qg, kg, vg), do)

    return fwd, bench_ms(step, grad_to_none=[qg, kg, vg])


def ours(slope, cu):
    return lambda q, k, v: LT.lightning_attention_triton(q, k, v, slope, cu)[0]


def sdpa(q, k, v):
    """[T, H, d] -> [1, H, T, d] (4-D, so the flash backend is eligible)."""
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)


def executed_flops_bytes(T, n_segs, cfg_blocks, BT=64, d=D, heads=H):
    """FLOPs our kernels execute and bytes they must move (q, k, v, o, do, grads, states)."""
    NV3, NK4, NV6, NK6 = (d // b for b in cfg_blocks)
    dd, btd = 2 * d * d, 2 * BT * d
    per_tok = {
        "segment_kv": dd,
        "fwd_output": NV3 * btd + btd + 2 * dd,
        "bwd_dq": NK4 * btd + btd + 3 * dd,
        "bwd_dkdv": NV6 * btd + btd + 2 * dd + NK6 * btd + btd + 2 * dd,
    }
    flops = {n: f * T * heads for n, f in per_tok.items()}
    unit = T * heads * d * 2  # one [T, H, d] bf16 tensor
    state = n_segs * heads * d * d * 4
    bytes_ = {
        "segment_kv": 2 * unit + state,
        "scan": 2 * state,
        "fwd_output": 4 * unit + state,
        "bwd_dq": 5 * unit + 2 * state,
        "bwd_dkdv": 6 * unit + state,
    }
    return flops, bytes_, unit


def kernel_breakdown(T, slope, ceil):
    q, k, v, do = make_inputs(T, seed=3)
    seg = LT.TUNING["segment"] or LT._segment_size(T, H, LT.TUNING["chunk"])
    cfg = LT._Config(chunk=LT.TUNING["chunk"], segment=seg, prec="tf32", upcast=False,
                     kv_block=LT.TUNING["kv_block"], out_block=LT.TUNING["out_block"],
                     dq_block=LT.TUNING["dq_block"], dkdv_block=LT.TUNING["dkdv_block"])
    bounds, doc_segs, n_segs = LT._segment_layout((0, T), seg, q.device)
    states = FW.segment_kv(k, v, slope, bounds, n_segs, cfg)
    scratch = states.clone()
    res = {}
    res["segment_kv"] = bench_ms(lambda: FW.segment_kv(k, v, slope, bounds, n_segs, cfg))
    res["scan"] = bench_ms(lambda: FW.segment_scan(scratch, slope, bounds, doc_segs, 1, None, None, False))
    FW.segment_scan(states, slope, bounds, doc_segs, 1, None, None, False)
    res["fwd_output"] = bench_ms(lambda: FW.fwd_output(q, k, v, slope, bounds, states, n_segs, cfg))
    res["bwd_dq"] = bench_ms(lambda: BW.bwd_dq(q, k, v, do, slope, bounds, states, n_segs, cfg))
    _, dstates = BW.bwd_dq(q, k, v, do, slope, bounds, states, n_segs, cfg)
    res["bwd_dkdv"] = bench_ms(lambda: BW.bwd_dkdv(q, k, v, do, slope, bounds, dstates, n_segs, cfg))
    flops, bytes_, _ = executed_flops_bytes(T, n_segs, (min(D, cfg.out_block), min(D, cfg.dq_block),
                                                         min(D, cfg.dkdv_block), min(D, cfg.dkdv_block)))
    out = {}
    for name, ms in res.items():
        b = bytes_[name]
        f = flops.get(name, 0)
        out[name] = {"ms": ms, "GBps": b / ms / 1e6, "TFLOPs": f / ms / 1e9,
                     "floor_ms": max(b / (ceil["copy_TBps"] * 1e9), f / (ceil["bf16_matmul_TFLOPs"] * 1e9))}
    return {"T": T, "segment": seg, "n_segments": n_segs, "kernels": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4K and 16K only")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-fp32-check", action="store_true")
    ap.add_argument("--no-fla", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    log(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}")
    result = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "H": H, "d": D,
              "dtype": "bf16", "tuning": dict(LT.TUNING)}
    fla_fn, fla_ver = (None, None) if args.no_fla else load_fla()
    result["fla"] = fla_ver

    ceil = ceilings()
    result["ceilings"] = ceil
    log(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s")

    slope = minimax_slopes(H).cuda()
    # Autotune ours (and fla) at a representative size first: the tuning key has no T.
    t0 = time.perf_counter()
    q, k, v, do = make_inputs(65536)
    time_fn = ours(slope, None)
    qg, kg, vg = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.autograd.backward(time_fn(qg, kg, vg), do)
    log(f"tuned ours in {time.perf_counter() - t0:.0f}s")
    picked = {}
    for name, kern in (("segment_kv", FW._segment_kv_kernel), ("fwd_output", FW._fwd_output_kernel),
                       ("bwd_dq", BW._bwd_dq_kernel), ("bwd_dkdv", BW._bwd_dkdv_kernel)):
        picked[name] = str(getattr(kern, "best_config", None))
    result["autotuned"] = picked
    log(f"autotuned: {picked}")
    if fla_fn is not None:
        t0 = time.perf_counter()
        try:
            torch.autograd.backward(fla_call(fla_fn, qg, kg, vg, slope, None), do)
            log(f"tuned fla in {time.perf_counter() - t0:.0f}s")
            from fla.ops.common import chunk_h, chunk_o
            fla_picked = {n: str(getattr(unwrap_autotuner(getattr(m, n, None)), "best_config", None)) for m, n in (
                (chunk_h, "chunk_fwd_kernel_h"), (chunk_h, "chunk_bwd_kernel_dh"), (chunk_o, "chunk_fwd_kernel_o"),
                (chunk_o, "chunk_bwd_kernel_dqkwg"), (chunk_o, "chunk_bwd_kernel_dv"))}
            result["fla_autotuned"] = fla_picked
            log(f"fla autotuned: {fla_picked}")
        except Exception as err:  # noqa: BLE001
            log(f"fla failed ({type(err).__name__}: {str(err)[:300]}); fla columns skipped")
            fla_fn = None
    del q, k, v, do, qg, kg, vg
    torch.cuda.empty_cache()

    # ---- correctness
    seed = random.SystemRandom().randrange(2**31)
    checks = {"seed": seed, "bf16_H8": check_16k(torch.bfloat16, 8, seed)}
    log(f"16K check bf16 (H=8, 23 docs incl. 3 of length 1, initial+final state): {checks['bf16_H8']}")
    if not args.no_fp32_check:
        t0 = time.perf_counter()
        checks["fp32_H2"] = check_16k(torch.float32, 2, seed + 1)
        log(f"16K check fp32 (H=2): {checks['fp32_H2']} ({time.perf_counter() - t0:.0f}s incl. compile)")
    if fla_fn is not None:
        q, k, v, _ = make_inputs(4096, seed=5)
        cu = cu_of(packed_lengths(4096, 7, 5))
        o_ours = LT.lightning_attention_triton(q, k, v, slope, cu)[0]
        o_fla = fla_call(fla_fn, q, k, v, slope, cu)
        o_ref = lightning_attention_chunked(q.double(), k.double(), v.double(), slope.double(), cu)[0]
        checks["vs_fla_4K_packed"] = {"ours_vs_ref": rel(o_ours, o_ref), "fla_vs_ref": rel(o_fla, o_ref),
                                      "ours_vs_fla": rel(o_ours, o_fla)}
        log(f"4K packed forward vs fp64 reference: {checks['vs_fla_4K_packed']}")
    result["correctness"] = checks
    torch.cuda.empty_cache()

    # ---- per-kernel breakdown
    if not args.quick:
        result["breakdown"] = kernel_breakdown(65536, slope, ceil)
        for name, r in result["breakdown"]["kernels"].items():
            log(f"64K {name:11s} {r['ms']:7.3f} ms  {r['GBps']:6.0f} GB/s  {r['TFLOPs']:5.0f} TFLOP/s  "
                f"floor {r['floor_ms']:.3f} ms")

    # ---- segment-size sweep (a runtime parameter: no recompilation); the table uses the best
    best_seg = {}
    if not args.no_sweep and not args.quick:
        sweep = []
        for T, segs in ((4096, (128, 256, 512)), (16384, (256, 512, 1024)), (65536, (1024, 2048, 4096)),
                        (262144, (1024, 2048, 4096))):
            q, k, v, do = make_inputs(T)
            for seg in segs:
                LT.TUNING["segment"] = seg
                fwd, fb = time_pair(ours(slope, None), q, k, v, do)
                sweep.append({"T": T, "segment": seg, "fwd_ms": fwd, "fwd_bwd_ms": fb})
                log(json.dumps(sweep[-1]))
            best_seg[T] = min((r for r in sweep if r["T"] == T), key=lambda r: r["fwd_bwd_ms"])["segment"]
            LT.TUNING["segment"] = None
            del q, k, v, do
            torch.cuda.empty_cache()
        result["segment_sweep"] = sweep
        result["best_segment"] = best_seg

    # ---- main table
    cases = [(4096, None), (16384, None)] + ([] if args.quick else [(65536, None), (262144, None),
                                                                   (65536, packed_lengths(65536, 64, 7))])
    rows = []
    for T, lens in cases:
        q, k, v, do = make_inputs(T)
        cu = cu_of(lens) if lens else None
        LT.TUNING["segment"] = best_seg.get(T)
        row = {"T": T, "docs": len(lens) if lens else 1,
               "segment": LT.TUNING["segment"] or LT._segment_size(T, H, LT.TUNING["chunk"])}
        row["fwd_ms"], row["fwd_bwd_ms"] = time_pair(ours(slope, cu), q, k, v, do)
        row["Mtok_per_s"] = T / row["fwd_bwd_ms"] / 1e3
        if fla_fn is not None:
            try:
                row["fla_fwd_ms"], row["fla_fwd_bwd_ms"] = time_pair(
                    lambda a, b, c, cu=cu: fla_call(fla_fn, a, b, c, slope, cu), q, k, v, do)
                row["speedup_vs_fla"] = row["fla_fwd_bwd_ms"] / row["fwd_bwd_ms"]
            except torch.OutOfMemoryError:
                row["fla_fwd_bwd_ms"] = "OOM"
        if lens is None and T <= 65536:
            row["sdpa_fwd_ms"], row["sdpa_fwd_bwd_ms"] = time_pair(sdpa, q, k, v, do)
        rows.append(row)
        log(json.dumps(row))
        del q, k, v, do
        torch.cuda.empty_cache()
    LT.TUNING["segment"] = None
    result["rows"] = rows

    # ---- outputs
    text = json.dumps(result, indent=1, default=str)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lightning_attention.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "lightning_attention.json").write_text(text)

    def f(x, fmt="{:.3f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else (x or "-")

    log("\nlightning attention, H=64, d=128, bf16, " + dev)
    log(f"{'T':>7} {'docs':>4} {'seg':>5} {'fwd ms':>8} {'fwd+bwd':>8} {'Mtok/s':>7} {'fla fwd':>8} {'fla f+b':>8} "
        f"{'speedup':>7} {'SDPA fwd':>9} {'SDPA f+b':>9}")
    for r in rows:
        log(f"{r['T']:>7} {r['docs']:>4} {r['segment']:>5} {f(r['fwd_ms']):>8} {f(r['fwd_bwd_ms']):>8} {f(r['Mtok_per_s'], '{:.1f}'):>7} "
            f"{f(r.get('fla_fwd_ms')):>8} {f(r.get('fla_fwd_bwd_ms')):>8} {f(r.get('speedup_vs_fla'), '{:.2f}x'):>7} "
            f"{f(r.get('sdpa_fwd_ms')):>9} {f(r.get('sdpa_fwd_bwd_ms')):>9}")


if __name__ == "__main__":
    main()
