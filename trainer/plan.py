"""`python -m trainer.plan <trainer.train overrides> plan.world_size=N [plan.device_memory_gib=80]`: memory per rank.

Nothing is allocated: the model is built on the meta device and cut by the same `parallelize`, and the gradient
buckets and the distributed optimizer are built on it, for one rank of a fake process group of N ranks
(torch's FakeStore + fake backend), so every group size and every padded bucket is the real one. Activations
come from `trainer.activation_memory` (per layer kind, at the stage's window and micro-batch size, with and
without recompute). Ends with `max per-rank memory: X GiB (...)`; exit code 2, naming the largest item, when
that exceeds `plan.device_memory_gib`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .config import ConfigError, compose_config
from .schedules import BatchSchedule

GIB = 2 ** 30
PLAN_KEYS = {"world_size": int, "device_memory_gib": float, "runtime_reserve_gib": float}
# CUDA context, NCCL communicators and allocator fragmentation: not visible to any tensor count
DEFAULT_RUNTIME_RESERVE_GIB = 2.0
DEFAULT_DEVICE_MEMORY_GIB = 80.0


@dataclass
class StateBytes:
    parameters: int  # compute-dtype flat parameter buffers (padding included)
    gradients: int  # fp32 main grads + reduce-scatter output slices
    optimizer: int  # fp32 master slices (when parameters are not fp32) + AdamW moments
    parameters_by_kind: dict


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(grad_sync, optimizer) -> StateBytes:
    """Bytes of this rank's parameters, gradients and optimizer state as the objects hold them (meta or real)."""
    params = grads = opt = 0
    kinds: dict = {}
    for b, master, moments in optimizer.slices():
        params += _nbytes(b.flat_params)
        kind = "experts" if b.grad_group == "edp" else "dense"
        kinds[kind] = kinds.get(kind, 0) + _nbytes(b.flat_params)
        grads += _nbytes(b.main_grad) + (_nbytes(b.grad_shard) if b.grad_shard._base is not b.main_grad else 0)
        # fp32 parameters are their own master weights (DistributedAdamW aliases the slice)
        opt += (_nbytes(master) if master.dtype != b.flat_params.dtype else 0) + sum(map(_nbytes, moments.values()))
    return StateBytes(params, grads, opt, kinds)


def _meta_rank(cfg, model_cfg, world: int, rank: int, param_dtype):
    """Topology, model, GradSync and optimizer of `rank` in a fake world of `world` ranks, all on meta."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel import Topology, build_optimizer

    from .layout import build_model_on_meta

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        topo = Topology.from_config(cfg.parallel, model_cfg, seq_len=int(cfg.stage.seq_len))
        model = build_model_on_meta(model_cfg, topo, bool(cfg.trainer.recompute)).to(param_dtype)
        o = cfg.optim
        optimizer, grad_sync = build_optimizer(model, topo, lr=float(o.lr), weight_decay=float(o.weight_decay),
                                               impl="foreach")
        return topo, state_bytes(grad_sync, optimizer)
    finally:
        dist.destroy_process_group()


def plan(overrides: list[str]) -> tuple[list[tuple[str, float]], float, list[str], float]:
    """(rows of (item, GiB), the total GiB, the printed lines, plan.device_memory_gib) for the overrides."""
    from .activation_memory import activation_bytes
    from .layout import check_batches, check_layout
    from .train import build_model_config

    options, rest = {}, []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.startswith("plan."):
            name = key[len("plan."):]
            if name not in PLAN_KEYS:
                raise ConfigError(f"{key}: unknown planner setting (known: {', '.join('plan.' + k for k in PLAN_KEYS)})")
            try:
                options[name] = PLAN_KEYS[name](value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        else:
            rest.append(o)
    if "world_size" not in options:
        raise ConfigError("plan.world_size=N is required (the number of ranks to plan for)")
    cfg = compose_config(rest)
    world = options["world_size"]
    model_cfg = build_model_config(cfg)
    seq_len, mbs = int(cfg.stage.seq_len), int(cfg.trainer.micro_batch_size)
    spec = check_layout(cfg.parallel, world, model_cfg, seq_len)
    dtype = "bf16" if cfg.trainer.dtype in ("bf16", "auto") else "fp32"  # auto: bf16 on the GPUs planned for
    param_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    recompute = bool(cfg.trainer.recompute)
    reserve = options.get("runtime_reserve_gib", DEFAULT_RUNTIME_RESERVE_GIB)
    pipeline = spec.pipeline
    stages = 1 if pipeline is None else pipeline.pp
    micro = check_batches(BatchSchedule.from_config(cfg.schedule.batch), spec, mbs, seq_len)  # per rank and step
    ranks = []  # per pipeline rank (one rank of each stage; all others of a stage are alike)
    for pp_rank in range(stages):
        topo, state = _meta_rank(cfg, model_cfg, world, pp_rank * (world // stages), param_dtype)
        sizes = {"tp": topo.tp, "sequence_parallel": topo.sequence_parallel, "cp": topo.cp, "ep": topo.ep,
                 "etp": topo.etp}

        def activations(layers, r, sizes=sizes):
            return activation_bytes(model_cfg, tokens=mbs * seq_len, micro_batch_size=mbs, compute_dtype=dtype,
                                    recompute=r, device_type="cuda", layers=layers, **sizes)

        if pipeline is None:
            acts = {r: activations(None, r) for r in (False, True)}
            peak, held = acts[recompute]["peak"], ""
        else:
            local = [pipeline.stage_layers[s] for s in pipeline.local_stages(pp_rank)]
            acts = {r: activations([i for layers in local for i in layers], r) for r in (False, True)}
            per_stage = [activations(layers, recompute) for layers in local]
            in_flight = pipeline.in_flight(pp_rank, min(micro))
            # the largest local stage stands for every micro-batch in flight, plus one layer recreated in backward
            peak = in_flight * max(a["kept"] for a in per_stage) + max(
                max(a["recomputed_layer"], a["head_transient"]) for a in per_stage)
            held = f", {in_flight} stage micro-batches in flight"
        rows = [
            (f"parameters ({dtype}; dense {state.parameters_by_kind.get('dense', 0) / GIB:.2f}, experts "
             + f"{state.parameters_by_kind.get('experts', 0) / GIB:.2f})", state.parameters / GIB),
            ("gradients (fp32 main grads; reduce-scattered in place)", state.gradients / GIB),
            ("master weights + AdamW moments (fp32, this rank's slice)", state.optimizer / GIB),
            (f"activations ({'recompute' if recompute else 'no recompute'}, peak in backward{held})", peak / GIB),
            ("runtime reserve (CUDA context, NCCL, fragmentation)", reserve),
        ]
        ranks.append((sum(v for _, v in rows), pp_rank, rows, acts))
    total, worst, rows, acts = max(ranks, key=lambda r: r[0])
    lines = [f"plan: {spec.description}, world {world}, window {seq_len} x micro-batch {mbs}, params {dtype}"]
    if pipeline is not None:
        lines.append("pipeline rank: layers, GiB per rank (params | grads | master+moments | activations | total)")
        for t, pp_rank, r, _ in ranks:
            layers = [i for s in pipeline.local_stages(pp_rank) for i in pipeline.stage_layers[s]]
            lines.append(f"  {pp_rank:>3}: {len(layers):>3} layers  " + " | ".join(f"{v:.2f}" for _, v in r[:4])
                         + f" | {t:.2f}")
        lines.append("pipeline bubble: " + ", ".join(
            f"{pipeline.bubble_fraction(n):.1%} at {n} micro-batches per rank" for n in sorted(set(micro))))
    lines.append(f"{'item':<72}{'GiB':>10}" + ("" if pipeline is None else f"  (pipeline rank {worst})"))
    lines += [f"{name:<72}{value:>10.2f}" for name, value in rows]
    counts = acts[recompute]["per_layer_kind_counts"]
    lines.append("activations per layer kind (GiB, without | with recompute, one micro-batch):")
    for layer_kind in ("lightning", "softmax", "moe", "embedding", "head"):
        n = counts.get(layer_kind, 1)
        without, with_recompute = acts[False][layer_kind] / GIB, acts[True][layer_kind] / GIB
        lines.append(f"  {layer_kind:<12} x{n:<4}{without:>10.3f} |{with_recompute:>10.3f}")
    which = "every rank" if pipeline is None else f"pipeline rank {worst}"
    lines.append(f"max per-rank memory: {total:.2f} GiB ({which}: {spec.description})")
    return rows, total, lines, options.get("device_memory_gib", DEFAULT_DEVICE_MEMORY_GIB)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rows, total, lines, device = plan(argv)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if total > device:
        name, value = max(rows, key=lambda r: r[1])
        print(f"error: plan.device_memory_gib={device:g}: {total:.2f} GiB per rank does not fit; the largest item "
              f"is {name} at {value:.2f} GiB", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
