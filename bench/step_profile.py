"""Where a training step's time goes: torch.profiler over steps of the real trainer, time per op class.

    python bench/step_profile.py [--warmup 2 --timed 3 --steps 2 --json out.json --trace t.json.gz] OVERRIDES
    python bench/step_profile.py --load out.json          # the table again, from a saved profile

OVERRIDES are `trainer.train`'s (model=proxy_1gpu stage=main_8k ...). The script runs
`trainer.train.main_from_overrides` with `Trainer.train_step` wrapped from the outside: `--warmup` steps
(compilation, autotuning), `--timed` plain steps (tokens/s, peak memory), one profiler warm-up step, then
`--steps` profiled steps. For those only, record_function ranges go around the decoder layers, the two
attention cores (`mix`), the MoE (router + permutation) and its expert FFNs, and the optimizer
(`layout.sync_and_clip`, `optimizer.step`, `optimizer.zero_grad`). Each device kernel (CPU: each op's self
time) gets the ranges around its launch; a backward kernel also those of the forward op that made its
autograd node (same sequence number; a recompute's forward has its own). Classes, first match:
communication (NCCL), optimizer, grad accumulation (`main_grad += grad` in AccumulateGrad), lightning /
softmax attention (inside `mix`), GEMMs (expert GEMMs inside the expert FFNs, the router's with the router,
the rest dense: projections and LM head), router + permutation (the MoE outside its FFNs), norms/elementwise
(everything else: norms, activations, residuals, RoPE, embedding, the loss's softmax); host gaps = step wall
time - device busy time.

Each class's bound is max(FLOPs / peak, bytes / bandwidth) (H200: 989 TFLOP/s dense bf16, 4.8 TB/s),
counted from the config in `class_work`; model FLOPs/token and MFU use the same counts.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = ("dense GEMMs", "expert GEMMs (grouped)", "lightning attention", "softmax attention",
           "norms/elementwise", "router + permutation", "communication", "grad accumulation", "optimizer",
           "host gaps")
CORES = ("lightning", "softmax", "router", "experts")  # ranges that decide a kernel's class (innermost wins)
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_grouped_mm"}
PREFIX = "mp::"  # this script's record_function ranges
EVAL = "autograd::engine::evaluate_function: "


# ---- FLOPs and bytes from the config ------------------------------------------------------------------
def class_work(m: dict, tokens: float, micro_batches: float, c: int, n_slice: int, n_main: int) -> dict:
    """{class: (FLOPs, bytes)} of one step on one rank. m: model config (dict, with seq_len); tokens: the
    rank's share of the step (global batch / world); micro_batches: per rank; c: compute dtype bytes;
    n_slice: optimizer elements of the rank (master slices); n_main: fp32 main-grad elements of the rank.

    FLOPs per token, forward (backward = 2 x forward, a step 3 x); h hidden, q = heads x head_dim,
    kv = kv_heads x head_dim, f expert FFN, k top-k, E experts, V vocab, S window, nL / nS lightning /
    softmax layers, L = nL + nS:
      dense GEMMs    nL * 2h*5q (qkv, output gate, out) + nS * (2h(q + 2kv) + 2qh) + 2hV (LM head)
      expert GEMMs   L * k * 3 * 2hf (gate, up, down of the k experts a token goes to)
      lightning      nL * 4 * heads * head_dim^2 (o = q S, S += k^T v)
      softmax        nS * 2 * S * heads * head_dim (causal QK^T and PV over S/2 keys on average)
      router         L * 2hE
    Bytes (floors): GEMMs and attention cores read inputs and write outputs once per pass (forward, input
    grad, weight grad), weights once per pass and micro-batch, the LM head's fp32 logits twice (forward and
    the backward's recompute); elementwise: each logical operation (a norm, an activation, a gate, a residual
    combine, RoPE, SwiGLU, the embedding row, the loss's pass over the fp32 logits) reads its inputs and
    writes its output once forward, twice backward; router + permutation: fp32 router input, the gather into
    expert order, the gate scaling and the scatter-add back, 3x; grad accumulation: bf16 grad read + fp32
    main grad read and written, per parameter and micro-batch; optimizer: fused AdamW (fp32 grad, master,
    two moments: 28 B) + grad norm (4) + clip (8) + master -> parameter copy (4 + c) per element of the
    slice, zeroing the main grads (4 B per element).
    """
    h, heads, d, kvh = m["hidden_size"], m["num_heads"], m["head_dim"], m["num_kv_heads"]
    q, kv, f, k = heads * d, kvh * d, m["ffn_hidden_size"], m["top_k"]
    E, V = m["num_experts"], m["vocab_size"]
    nS = sum(t == "softmax" for t in m["layer_types"])
    L = len(m["layer_types"])
    nL = L - nS
    dense_params = nL * 5 * h * q + nS * (2 * h * q + 2 * h * kv) + h * V
    dense_io = nL * ((h + 3 * q) + (h + q) + (q + h)) + nS * (4 * h + 2 * q + 2 * kv) + h
    per_token_fwd = {
        "dense GEMMs": 2 * dense_params,
        "expert GEMMs (grouped)": L * k * 6 * h * f,
        "lightning attention": nL * 4 * heads * d * d,
        "softmax attention": nS * 2 * m["seq_len"] * heads * d,
        "router + permutation": L * 2 * h * E,
    }
    flops = {name: 3 * v * tokens for name, v in per_token_fwd.items()}
    elementwise = 3 * c * (L * (2 * 2 * h + 2 * 3 * h + 3 * k * f) + nL * 11 * q + nS * 2 * (q + kv) + 4 * h)
    weights = micro_batches * 3 * c
    nbytes = {
        "dense GEMMs": tokens * (3 * c * dense_io + 2 * 4 * V + c * V) + weights * dense_params,
        "expert GEMMs (grouped)": tokens * L * k * 9 * (h + f) * c + weights * L * E * 3 * h * f,
        "lightning attention": tokens * nL * 11 * q * c,
        "softmax attention": tokens * nS * 6 * (q + kv) * c,
        "norms/elementwise": tokens * (elementwise + 8 * V + c * V),
        "router + permutation": tokens * 3 * L * (h * (c + 4) + 5 * k * h * c + 3 * h * c),
        "grad accumulation": micro_batches * n_main * (8 + c),
        "optimizer": n_slice * (28 + 4 + 8 + 4 + c) + 4 * n_main,
    }
    return {name: (flops.get(name, 0.0), nbytes.get(name, 0.0)) for name in CLASSES}


def head_flops(m: dict, tokens: float) -> float:
    return 3 * 2 * m["hidden_size"] * m["vocab_size"] * tokens


# ---- the profiled run ---------------------------------------------------------------------------------
def _ranged(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + name):
            return fn(*args, **kwargs)
    return wrapper


def add_ranges(trainer) -> None:
    """record_function ranges on the trainer's model and optimizer (instance attributes; nothing else)."""
    from model.attention import LightningAttention, SoftmaxAttention
    from model.moe import MoE, SwiGLUExperts
    from model.transformer import DecoderLayer

    for module in trainer.model.modules():
        if isinstance(module, DecoderLayer):
            module.forward = _ranged(module.forward, "decoder")
        elif isinstance(module, (LightningAttention, SoftmaxAttention)):
            kind = "lightning" if isinstance(module, LightningAttention) else "softmax"
            module.mix = _ranged(module.mix, kind)
        elif isinstance(module, MoE):
            module.forward = _ranged(module.forward, "router")
        elif isinstance(module, SwiGLUExperts):
            module.forward = _ranged(module.forward, "experts")
    for owner, attr in ((trainer.layout, "sync_and_clip"), (trainer.optimizer, "step"),
                        (trainer.optimizer, "zero_grad")):
        setattr(owner, attr, _ranged(getattr(owner, attr), "optimizer"))


def run_profiled(overrides: list[str], warmup: int, timed: int, steps: int, trace: str | None) -> dict:
    """Train warmup + timed + 1 + steps steps; rank 0 returns the profile (other ranks: {})."""
    from trainer.loop import Trainer
    from trainer.train import build_model_config, main_from_overrides

    total = warmup + timed + 1 + steps
    records, state = [], {}
    original = Trainer.train_step

    def train_step(self):
        n = len(records)
        if n == warmup + timed:  # the profiler's warm-up step (outside the step ranges), then profiled ones
            add_ranges(self)
            cuda = self.device.type == "cuda"
            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
            state["prof"] = profile(activities=activities)
            state["prof"].start()
            sizes = [(master.numel(), b.main_grad.numel()) for b, master, _ in self.optimizer.slices()]
            state.update(model=dict(build_model_config(self.cfg).to_dict(), seq_len=self.seq_len),
                         c=2 if self.autocast_dtype is not None else 4, world=self.env.world_size,
                         dp=self.layout.dp, rank=self.env.rank, trainer_flops_per_token=self.flops_per_token,
                         n_slice=sum(a for a, _ in sizes), n_main=sum(b for _, b in sizes),
                         device=torch.cuda.get_device_name(self.device) if cuda else "cpu")
        with record_function(PREFIX + "step") if n > warmup + timed else contextlib.nullcontext():
            metrics = original(self)
        records.append(metrics)
        if len(records) == total:
            state["prof"].stop()
        return metrics

    Trainer.train_step = train_step
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            fixed = ["schedule.lr.warmup_steps=1", "schedule.lr.decay_steps=0",
                     "schedule.lr.drop_at_step=null", "schedule.lr.drop_at_tokens=null",
                     "trainer.checkpoint.every=0", "trainer.checkpoint.at_end=false",
                     "logging.progress_bar=false", "logging.wandb.mode=disabled", "trainer.log_every=1",
                     f"trainer.run_dir={run_dir}"]
            code = main_from_overrides([*fixed, *overrides, f"trainer.steps={total}"])
    finally:
        Trainer.train_step = original
    if code != 0 or len(records) != total:
        raise SystemExit(f"step_profile: the trainer exited with code {code} after {len(records)} of {total} "
                         f"steps")
    prof = state.pop("prof")
    if state["rank"] != 0:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        text = path.read_text()
    if trace:
        with gzip.open(trace, "wt") as fh:
            fh.write(text)
    rows, windows = profile_rows(json.loads(text)["traceEvents"])
    plain = records[warmup:warmup + timed]
    return {
        "overrides": overrides, **state,
        "global_batch_tokens": plain[-1]["global_batch_tokens"], "micro_batches": plain[-1]["micro_batches"],
        "timed_step_s": [r["step_time_s"] for r in plain],
        "profiled_step_s": [r["step_time_s"] for r in records[-steps:]],
        "trainer_mfu": [r["mfu"] for r in plain], "loss": [r["loss"] for r in records],
        "peak_memory_gib": max(r["memory_gib"] for r in records), **windows, "rows": rows,
    }


# ---- the trace -> rows --------------------------------------------------------------------------------
class _Event:
    __slots__ = ("child_us", "ctx", "e", "end", "ts")

    def __init__(self, e):
        self.e, self.ts, self.child_us = e, float(e["ts"]), 0.0
        self.end = self.ts + float(e.get("dur", 0))


def _context(parent_ctx, e) -> tuple:
    """(ranges outer -> inner, the innermost autograd node's (sequence number, forward thread index) or None,
    inside AccumulateGrad)."""
    ranges, node, accumulate = parent_ctx
    name, args = e["name"], e.get("args", {})
    if name.startswith(PREFIX):
        ranges += (name[len(PREFIX):],)
    elif name.startswith(EVAL):
        node = (args.get("Sequence number"), args.get("Fwd thread id"))
        accumulate = accumulate or "AccumulateGrad" in name
    return ranges, node, accumulate


def profile_rows(events: list) -> tuple[list, dict]:
    """The trace's device kernels (CPU: ops' self time) in the profiled steps, summed by what decides their
    class: rows of [kernel, op, ranges, accumulate, count, microseconds]; also wall and busy time."""
    host, launches, device = defaultdict(list), {}, []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            device.append(e)
        elif cat in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"):
            ev = _Event(e)
            host[e["tid"]].append(ev)
            if cat.startswith("cuda") and "correlation" in e.get("args", {}):
                launches[e["args"]["correlation"]] = ev
    forward = defaultdict(list)  # (thread, sequence number) -> [(ts, ranges)] of the forward ops
    parents = {}
    for tid, evs in host.items():
        evs.sort(key=lambda ev: (ev.ts, -ev.end))
        stack = []
        for ev in evs:
            while stack and stack[-1].end <= ev.ts:
                stack.pop()
            parent = stack[-1] if stack else None
            parents[id(ev)] = parent
            ev.ctx = _context(parent.ctx if parent else ((), None, False), ev.e)
            if parent is not None:
                parent.child_us += ev.end - ev.ts
            seq = ev.e.get("args", {}).get("Sequence number")
            if (seq is not None and ev.e.get("cat") == "cpu_op" and not ev.e["name"].startswith("autograd::")
                    and not (parent and parent.e["name"].startswith(EVAL))):
                forward[tid, seq].append((ev.ts, ev.ctx[0]))
            stack.append(ev)
    for v in forward.values():
        v.sort(key=lambda x: x[0])
    forward = {key: ([ts for ts, _ in v], [r for _, r in v]) for key, v in forward.items()}
    # A backward node names its forward thread by the profiler's own index, and sequence numbers count per
    # thread (a recompute runs forwards on the backward's thread): map each index to the thread whose forward
    # ops carry the sequence numbers of most of its nodes.
    threads_of = defaultdict(set)
    for tid, seq in forward:
        threads_of[seq].add(tid)
    votes = defaultdict(lambda: defaultdict(int))
    for evs in host.values():
        for ev in evs:
            if ev.e["name"].startswith(EVAL) and ev.ctx[1][0] is not None:
                for tid in threads_of.get(ev.ctx[1][0], ()):
                    votes[ev.ctx[1][1]][tid] += 1
    thread_of = {index: max(v, key=v.get) for index, v in votes.items()}
    steps = sorted((ev.ts, ev.end, tid) for tid, evs in host.items() for ev in evs
                   if ev.e["name"] == PREFIX + "step")

    def in_step(ts):
        i = bisect.bisect_right(steps, (ts, math.inf, math.inf)) - 1
        return i >= 0 and ts < steps[i][1]

    def ranges_of(ev) -> tuple:
        ranges, node, _ = ev.ctx
        key = node and (thread_of.get(node[1]), node[0])
        if key in forward:  # a backward op: the ranges of the latest forward op that made its node
            times, fwd_ranges = forward[key]
            i = bisect.bisect_right(times, ev.ts) - 1
            if i >= 0:
                ranges = fwd_ranges[i] + ranges
        return ranges

    def innermost_op(ev) -> str:
        while ev is not None and ev.e.get("cat") != "cpu_op":
            ev = parents[id(ev)]
        return ev.e["name"] if ev is not None else ""

    agg, intervals = defaultdict(lambda: [0, 0.0]), []
    if device:
        for kernel in device:
            ts, dur = float(kernel["ts"]), float(kernel.get("dur", 0))
            if not in_step(ts):
                continue
            intervals.append((ts, ts + dur))
            launch = launches.get(kernel.get("args", {}).get("correlation"))
            key = ((kernel["name"], innermost_op(launch), ranges_of(launch), launch.ctx[2]) if launch
                   else (kernel["name"], "", (), False))
            agg[key][0] += 1
            agg[key][1] += dur
        busy = _union(intervals)
    else:  # CPU: every op's self time on the steps' thread
        busy = 0.0
        for tid in {tid for _, _, tid in steps}:
            for ev in host[tid]:
                if ev.e.get("cat") == "cpu_op" and in_step(ev.ts):
                    self_us = max(ev.end - ev.ts - ev.child_us, 0.0)
                    key = (ev.e["name"], ev.e["name"], ranges_of(ev), ev.ctx[2])
                    agg[key][0] += 1
                    agg[key][1] += self_us
                    busy += self_us
    rows = [[name, op, list(ranges), acc, n, us] for (name, op, ranges, acc), (n, us) in agg.items()]
    wall = sum(end - ts for ts, end, _ in steps)
    return rows, {"wall_us": wall, "busy_us": busy, "profiled_steps": len(steps)}


def _union(intervals: list) -> float:
    total, end = 0.0, -math.inf
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def classify(name: str, op: str, ranges: list, accumulate: bool) -> str:
    if "nccl" in name.lower() or op.startswith(("c10d::", "nccl:", "record_param_comms")):
        return "communication"
    if "optimizer" in ranges:
        return "optimizer"
    if accumulate:
        return "grad accumulation"
    # Only the innermost decoder layer's ranges count: a recompute's forward runs inside a backward node of
    # its layer, whose forward ranges come first.
    layer = ranges[len(ranges) - ranges[::-1].index("decoder"):] if "decoder" in ranges else ranges
    core = next((r for r in reversed(layer) if r in CORES), None)
    if core in ("lightning", "softmax"):
        return f"{core} attention"
    if op in GEMM_OPS or "gemm" in name.lower() or "nvjet" in name:
        if op == "aten::_grouped_mm" or core == "experts":
            return "expert GEMMs (grouped)"
        return "router + permutation" if core == "router" else "dense GEMMs"
    return "router + permutation" if core == "router" else "norms/elementwise"


# ---- the report ---------------------------------------------------------------------------------------
def report(p: dict, peak_tflops: float, peak_tbps: float) -> tuple[str, dict]:
    """The printed table and the summary of a profile (`run_profiled`'s dict)."""
    steps, m = p["profiled_steps"], p["model"]
    tokens = p["global_batch_tokens"] / p["world"]
    work = class_work(m, tokens, p["micro_batches"] / p["dp"], p["c"], p["n_slice"], p["n_main"])
    per_class, decoder = defaultdict(float), defaultdict(float)  # us per step: all, inside decoder layers
    for name, op, ranges, acc, _, us in p["rows"]:
        per_class[classify(name, op, ranges, acc)] += us / steps
        if "decoder" in ranges:
            decoder[classify(name, op, ranges, acc)] += us / steps
    per_class["host gaps"] = max(p["wall_us"] - p["busy_us"], 0.0) / steps
    decoder_us, wall_ms = sum(decoder.values()), p["wall_us"] / steps / 1e3
    flops_step, timed_s = sum(f for f, _ in work.values()), statistics.median(p["timed_step_s"])
    lines = [(f"{'class':<24}{'ms/step':>9}{'share':>7}{'layers ms':>11}{'TFLOP':>8}{'GB':>8}{'bound ms':>9}"
              f"{'x bound':>10}{'achieved':>15}")]
    table = []
    for name in CLASSES:
        ms, (flops, nbytes) = per_class.get(name, 0.0) / 1e3, work[name]
        flops_ms, bytes_ms = flops / peak_tflops / 1e9, nbytes / peak_tbps / 1e9
        bound = max(flops_ms, bytes_ms)
        achieved = ""
        if ms and bound:
            achieved = (f"{flops / ms / 1e9:.0f} TFLOP/s" if flops_ms >= bytes_ms
                        else f"{nbytes / ms / 1e6:.0f} GB/s")
        table.append({"class": name, "ms": ms, "share": ms / wall_ms, "decoder_ms": decoder[name] / 1e3,
                      "tflop": flops / 1e12, "gb": nbytes / 1e9, "bound_ms": bound,
                      "x_bound": ms / bound if bound else None})
        lines.append(f"{name:<24}{ms:>9.2f}{ms / wall_ms:>7.1%}{decoder[name] / 1e3:>11.2f}"
                     f"{flops / 1e12:>8.2f}{nbytes / 1e9:>8.2f}{bound:>9.2f}"
                     f"{ms / bound if bound else math.nan:>10.1f}{achieved:>15}")
    bound_ms = sum(r["bound_ms"] for r in table)
    lines.append(f"{'step (profiled)':<24}{wall_ms:>9.2f}{1:>7.0%}{decoder_us / 1e3:>11.2f}"
                 f"{flops_step / 1e12:>8.2f}{sum(b for _, b in work.values()) / 1e9:>8.2f}{bound_ms:>9.2f}"
                 f"{wall_ms / bound_ms:>10.1f}")
    peak = peak_tflops * 1e12
    decoder_flops = flops_step - head_flops(m, tokens)
    summary = {
        "flops_per_token": flops_step / tokens, "trainer_flops_per_token": p["trainer_flops_per_token"],
        "tokens_per_step": p["global_batch_tokens"], "step_s": timed_s,
        "tokens_per_s": p["global_batch_tokens"] / timed_s, "mfu_step": flops_step / timed_s / peak,
        "mfu_step_profiled": flops_step / (wall_ms / 1e3) / peak, "decoder_ms": decoder_us / 1e3,
        "mfu_decoder": decoder_flops / (decoder_us / 1e6) / peak if decoder_us else None,
        "peak_memory_gib": p["peak_memory_gib"], "plan_gib": p.get("plan_gib"), "table": table,
    }
    plan = f" (trainer.plan: {p['plan_gib']:.2f} GiB)" if "plan_gib" in p else ""
    mfu_decoder = f"{summary['mfu_decoder']:.1%}" if decoder_us else "n/a"
    types = m["layer_types"]
    head = [
        (f"device {p['device']} | {len(types)} layers ({types.count('softmax')} softmax), hidden "
         f"{m['hidden_size']}, {m['num_experts']} experts top-{m['top_k']}, FFN {m['ffn_hidden_size']}, "
         f"vocab {m['vocab_size']} | window {m['seq_len']} | {p['global_batch_tokens']} tokens/step in "
         f"{p['micro_batches']} micro-batches | world {p['world']}"),
        (f"model FLOPs/token {summary['flops_per_token'] / 1e9:.3f} G (trainer's count "
         f"{p['trainer_flops_per_token'] / 1e9:.3f} G) | peak {peak_tflops:g} TFLOP/s, {peak_tbps:g} TB/s"),
        (f"plain steps: {timed_s * 1e3:.1f} ms/step (median of {len(p['timed_step_s'])}), "
         f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu_step']:.1%} (trainer's "
         f"{statistics.median(p['trainer_mfu']):.1%}) | peak memory {p['peak_memory_gib']:.2f} GiB{plan}"),
        (f"profiled: {wall_ms:.1f} ms/step over {steps} steps, MFU {summary['mfu_step_profiled']:.1%}; "
         f"decoder layers {decoder_us / 1e3:.1f} ms of device time, MFU {mfu_decoder}"),
        "",
    ]
    tail = ["", "top kernels (ms/step, class, kernel | op):"]
    tail += [f"{r[5] / steps / 1e3:>9.2f}  {classify(*r[:4]):<24}{r[0][:70]} | {r[1]}"
             for r in sorted(p["rows"], key=lambda r: -r[5])[:12]]
    return "\n".join(head + lines + tail), summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="trainer.train overrides")
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing (compilation, autotuning)")
    ap.add_argument("--timed", type=int, default=3, help="plain steps timed after the warm-up")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--json", help="write the profile and the summary here")
    ap.add_argument("--trace", help="also write the chrome trace here (gzip)")
    ap.add_argument("--load", help="print the table of a saved --json instead of running")
    ap.add_argument("--no-plan", action="store_true", help="skip trainer.plan's prediction for the config")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--peak-tbps", type=float, default=4.8)
    args = ap.parse_args()
    if args.load:
        p = json.loads(Path(args.load).read_text())["profile"]
    else:
        p = run_profiled(args.overrides, args.warmup, args.timed, args.steps, args.trace)
        if not p:  # not rank 0
            return 0
        if not args.no_plan:
            from trainer.plan import plan

            _, p["plan_gib"], _, _ = plan([*args.overrides, f"plan.world_size={p['world']}"])
    text, summary = report(p, args.peak_tflops, args.peak_tbps)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "profile": p}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
