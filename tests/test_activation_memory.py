"""trainer.activation_memory against what autograd really saves: saved_tensors_hooks around the whole forward,
each saved storage counted once, for the model part that saved it first (parameters excluded); single process and
gloo layouts (TP/SP, EP x ETP, TP x CP), with and without recompute, at two window lengths."""

import gc
import os
import weakref

import pytest
import torch
from dist_harness import run_distributed

from model.config import ModelConfig
from model.transformer import MiniMaxForCausalLM
from trainer.activation_memory import activation_bytes

TOLERANCE = 0.10
WINDOWS = (64, 256)


def tiny_config(**overrides) -> ModelConfig:
    """conf/model/tiny.yaml's widths, one lightning and one softmax layer, a smaller vocabulary."""
    cfg = {"vocab_size": 1024, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "head_dim": 32,
           "num_kv_heads": 2, "layer_types": ["lightning", "softmax"], "num_experts": 8, "top_k": 2,
           "ffn_hidden_size": 256, "capacity_factor": None, "lightning_block_size": 64}
    return ModelConfig(**{**cfg, **overrides})


def build_model(cfg, topo=None, window_len=None) -> MiniMaxForCausalLM:
    """The model, or this rank's part of `topo`, with plain random weights: saved bytes do not depend on the
    values, and model.init's exact initialisation costs seconds per build."""
    from parallel import parallelize

    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg)
    if topo is not None:
        model = parallelize(model, topo, window_len=window_len)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02)  # norm weights 1, as initialised
    return model


class _Saved:
    """Holder of one saved tensor: alive exactly as long as autograd keeps it for backward."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor):
        self.tensor = tensor.detach()  # an output holding its own grad_fn would be a cycle, never freed


class SavedTensorMeter:
    """Storages saved in one forward, each with the model part running when it was first saved:
    ("embedding",), ("input", i) (what layer i's checkpoint keeps), ("mixer", i), ("moe", i), ("head",)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.part, self.saved, self.layer_args = ("embedding",), [], {}
        starts = [(model.embed_tokens, ("embedding",)), (model.norm, ("head",))]
        for i, layer in enumerate(model.layers.values()):
            starts += [(layer.input_layernorm, ("mixer", i)), (layer.post_attention_layernorm, ("moe", i))]
        # layer i's checkpoint saves its inputs right after the embedding or layer i-1 returns
        ends = [(m, ("input", i)) for i, m in enumerate([model.embed_tokens, *list(model.layers.values())[:-1]])]
        self.handles = [m.register_forward_pre_hook(self._enter(part)) for m, part in starts]
        self.handles += [m.register_forward_hook(self._enter(part)) for m, part in ends]
        self.handles += [layer.register_forward_pre_hook(self._record_args(i)) for i, layer in enumerate(model.layers.values())]

    def _enter(self, part):
        def hook(*_):
            self.part = part
        return hook

    def _record_args(self, i):
        def hook(_module, args):  # held, so that no later tensor reuses their memory (CUDA's allocator would)
            self.layer_args[i] = [a for a in args if isinstance(a, torch.Tensor)]
        return hook

    def _pack(self, tensor):
        holder = _Saved(tensor)
        self.saved.append((weakref.ref(holder), self.part))
        return holder

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)

    def storages(self) -> dict:
        """{storage: (bytes, part)} of what is still saved; cu_seqlens and positions (every checkpoint keeps
        them) count for the embedding."""
        gc.collect()
        shared = {a.untyped_storage().data_ptr() for args in self.layer_args.values() for a in args[1:]}
        out = {}
        for ref, part in self.saved:
            holder = ref()
            if holder is None:
                continue
            storage = holder.tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.params and ptr not in out:
                out[ptr] = (storage.nbytes(), ("embedding",) if ptr in shared else part)
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def measure(model, forward, autocast_dtype=None) -> dict:
    """{"parts": {part: bytes}, "layer_rest": [bytes of layer i's activations other than its input]}."""
    meter = SavedTensorMeter(model)
    device = next(model.parameters()).device.type
    try:
        autocast = torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
        with autocast, meter.hooks():
            out = forward(model)
        saved = meter.storages()
        del out
    finally:
        meter.close()
    parts = {}
    for nbytes, part in saved.values():
        parts[part] = parts.get(part, 0) + nbytes
    rest = [sum(n for ptr, (n, part) in saved.items()
                if part in (("mixer", i), ("moe", i)) and ptr != meter.layer_args[i][0].untyped_storage().data_ptr())
            for i in range(model.cfg.num_layers)]
    return {"parts": parts, "layer_rest": rest}


def compare(cfg, predicted: dict, measured: dict) -> list:
    """(label, predicted, measured) rows of every layer part and the total, without and with recompute, and what
    a recomputing backward holds while it recreates a layer: all it keeps plus that layer's activations but its
    input (the head's transient, which "peak" also weighs, is not a saved tensor: test_linear_cross_entropy's)."""
    rows = []
    for recompute in (False, True):
        pred, parts, tag = predicted[recompute], measured[recompute]["parts"], " (recompute)" * recompute
        for i, kind in enumerate(cfg.layer_types):
            rows.append((f"{kind} layer {i}{tag}", pred[kind], parts.get(("input" if recompute else "mixer", i), 0)))
            rows.append((f"moe {i}{tag}", pred["moe"], parts.get(("moe", i), 0)))
        rows += [(f"{kind}{tag}", pred[kind], parts.get((kind,), 0)) for kind in ("embedding", "head")]
        rows.append((f"total{tag}", pred["total"], sum(parts.values())))
    recreated = sum(measured[True]["parts"].values()) + max(measured[False]["layer_rest"])
    rows.append(("kept + one layer recreated", predicted[True]["kept"] + predicted[True]["recomputed_layer"],
                 recreated))
    return rows


def relative_error(predicted: int, measured: int) -> float:
    return abs(predicted - measured) / max(measured, 1)


def assert_close(rows, label):
    table = "\n".join(f"  {name:<34}{p:>12,}{m:>12,}{relative_error(p, m):>8.1%}" for name, p, m in rows)
    print(f"{label}: predicted / measured bytes\n{table}")
    bad = [name for name, p, m in rows if relative_error(p, m) > TOLERANCE]
    assert not bad, f"{label}: off by more than {TOLERANCE:.0%} in {bad}\n{table}"


def make_batch(cfg, T, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1), "cu_seqlens": torch.tensor([0, T], dtype=torch.int32)}
    return {k: v.to(device) for k, v in batch.items()}


def measure_both(model, batch, autocast_dtype=None) -> dict:
    """{recompute: measure(...)} for one model and micro-batch."""
    def forward(m):
        return m(batch["input_ids"], batch["cu_seqlens"], batch["labels"], positions=batch.get("positions"))

    out = {}
    for recompute in (False, True):
        model.recompute = recompute
        out[recompute] = measure(model, forward, autocast_dtype)
    return out


def predict_both(cfg, T, **kwargs) -> dict:
    return {recompute: activation_bytes(cfg, tokens=T, recompute=recompute, **kwargs) for recompute in (False, True)}


DTYPES = {"fp32": (None, torch.float32), "bf16": (torch.bfloat16, torch.float32),
          "bf16 params": (torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("T, dtypes", [(T, "fp32") for T in WINDOWS] + [(WINDOWS[0], "bf16"),
                                                                       (WINDOWS[0], "bf16 params")])
def test_single_process(T, dtypes):
    """The tiny preset's capacity factor (kept assignments are indexed); fp32, bf16 autocast with fp32
    parameters (every linear layer saves bf16 copies) and with bf16 parameters (the trainer's bf16; CPU bf16
    products are slow, so one window)."""
    autocast_dtype, param_dtype = DTYPES[dtypes]
    cfg = tiny_config(capacity_factor=2.0)
    model = build_model(cfg).to(param_dtype)
    measured = measure_both(model, make_batch(cfg, T), autocast_dtype)
    sizes = {"compute_dtype": "fp32" if autocast_dtype is None else "bf16",
             "param_dtype": "bf16" if param_dtype == torch.bfloat16 else "fp32", "device_type": "cpu"}
    rows = compare(cfg, predict_both(cfg, T, **sizes), measured)
    parts = measured[False]["parts"]
    rows.append(("pipeline stage of layer 0", activation_bytes(cfg, tokens=T, layers=[0], **sizes)["total"],
                 parts[("embedding",)] + parts[("mixer", 0)] + parts[("moe", 0)]))
    assert_close(rows, f"single process {dtypes}, T={T}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("T", [256, 4096])
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_cuda(T, dtypes):
    """device_type="cuda": Triton lightning kernel, varlen flash attention and grouped expert products (bf16)."""
    autocast_dtype, param_dtype = DTYPES[dtypes]
    cfg = tiny_config(capacity_factor=2.0)
    model = build_model(cfg).to("cuda", param_dtype)
    measured = measure_both(model, make_batch(cfg, T, device="cuda"), autocast_dtype)
    predicted = predict_both(cfg, T, compute_dtype="fp32" if autocast_dtype is None else "bf16",
                             param_dtype="bf16" if param_dtype == torch.bfloat16 else "fp32", device_type="cuda")
    assert_close(compare(cfg, predicted, measured), f"cuda {dtypes}, T={T}")


def test_lightning_triton_path(monkeypatch):
    """device_type="cuda" for the lightning layer: the Triton kernel's saved tensors (run by Triton's CPU
    interpreter), with segments short enough for two per window; CUDA's other kernels (varlen flash attention,
    grouped expert products) need a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernel on CPU")
    from kernels.lightning_triton import TUNING

    monkeypatch.setenv("MINIMAX_LIGHTNING_BACKEND", "triton")
    monkeypatch.setitem(TUNING, "segment", 128)
    T, cfg = 256, tiny_config(layer_types=["lightning"], num_layers=1)
    model = build_model(cfg).to(torch.bfloat16)
    batch = make_batch(cfg, T)
    measured = measure(model, lambda m: m(batch["input_ids"], batch["cu_seqlens"], batch["labels"]), torch.bfloat16)
    predicted = activation_bytes(cfg, tokens=T, compute_dtype="bf16", device_type="cuda")
    assert_close([("lightning layer 0", predicted["lightning"], measured["parts"][("mixer", 0)])],
                 f"lightning, Triton kernel, bf16, T={T}")


# ---------------------------------------------------------------- gloo layouts

def _measure_layouts(rank, world, cfg, layouts):
    """This rank's measurements {layout: {T: {recompute: ...}}} at every window length."""
    from parallel import Topology
    from parallel.zigzag import shard_batch

    results = {}
    for name in layouts:
        topo = Topology.build(model_cfg=cfg, **LAYOUTS[name][1])
        results[name] = {}
        for T in WINDOWS:
            model = build_model(cfg, topo, window_len=T)
            batch = make_batch(cfg, T, seed=topo.dp_rank)
            if topo.cp > 1:
                batch = shard_batch(batch, T, topo.cp_rank, topo.cp)
            results[name][T] = measure_both(model, batch)
    return results


def _reduce_ranks(per_rank: list, reduce) -> dict:
    """One measurement from every rank's: `reduce` (max or mean) of each part and each layer."""
    parts = {part for m in per_rank for part in m["parts"]}
    return {"parts": {part: reduce([m["parts"].get(part, 0) for m in per_rank]) for part in parts},
            "layer_rest": [reduce(values) for values in zip(*(m["layer_rest"] for m in per_rank))]}


def _mean(values):
    return round(sum(values) / len(values))


def with_gloo_reduce_scatter(rows, cfg, T, layout) -> list:
    """gloo has no reduce-scatter: parallel.collectives all-reduces and returns this rank's slice, a view of the
    whole sum. With SP the embedding's output, layer 0's input, then keeps tp times its share (NCCL: its share)."""
    tp, cp = layout.get("tp", 1), layout.get("cp", 1)
    if tp == 1 or not layout.get("sequence_parallel"):
        return rows
    extra = (tp - 1) * T // (cp * tp) * cfg.hidden_size * 4
    affected = {f"{cfg.layer_types[0]} layer 0", f"{cfg.layer_types[0]} layer 0 (recompute)", "total",
                "total (recompute)", "kept + one layer recreated"}
    return [(name, p + extra if name in affected else p, m) for name, p, m in rows]


LAYOUTS = {
    # TP: every rank saves the same
    "tp2 sp": (2, {"tp": 2, "sequence_parallel": True}, max),
    # expert rows depend on the routing: their mean over the ranks is the even share the prediction assumes
    "ep2 x etp2": (4, {"ep": 2, "etp": 2}, _mean),
    # CP rank 0 holds each window's first chunk (no LASP prefix state to apply): the others save the most.
    # Without SP, so that TP's replicated regions are covered too.
    "tp2 x cp2": (4, {"tp": 2, "cp": 2, "sequence_parallel": False}, max),
}


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layouts(world):
    cfg = tiny_config()
    names = [name for name, (size, _, _) in LAYOUTS.items() if size == world]
    per_rank = run_distributed(_measure_layouts, world, cfg, names)
    failures = []
    for name in names:
        _, layout, reduce = LAYOUTS[name]
        for T in WINDOWS:
            measured = {r: _reduce_ranks([m[name][T][r] for m in per_rank], reduce) for r in (False, True)}
            predicted = predict_both(cfg, T, device_type="cpu", **layout)
            rows = with_gloo_reduce_scatter(compare(cfg, predicted, measured), cfg, T, layout)
            try:
                assert_close(rows, f"{name}, T={T}")
            except AssertionError as err:
                failures.append(str(err))
    assert not failures, "\n".join(failures)
