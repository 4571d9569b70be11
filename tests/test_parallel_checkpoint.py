"""Checkpoints of shards only: TP=2 x CP=2 -> EP=4 -> one process continues the single-process run exactly, and
every rank's checkpoint file holds only the elements its distributed optimizer owns."""

import pytest
from dist_harness import run_distributed
from test_tensor_parallel import (
    SEQ_LEN,
    assert_matches,
    build_parallel,
    make_batches,
    reference_run,
    tiny_config,
    train_steps,
)

BYTES_PER_ELEMENT = 12  # fp32 master weight + two fp32 AdamW moments


def _owned_elements(grad_sync) -> int:
    return sum(min(b.shard[1], o + p.numel()) - max(b.shard[0], o)
               for b in grad_sync.buckets for p, o in zip(b.params, b.offsets) if max(b.shard[0], o) < min(b.shard[1], o + p.numel()))


def _tp2cp2_then_ep4(rank, world, cfg, batches, root):
    import os

    from parallel.checkpoint import load_checkpoint, save_checkpoint
    from parallel.topology import Topology

    topo = Topology.build(tp=2, cp=2, sequence_parallel=True, model_cfg=cfg, seq_len=SEQ_LEN)
    model, opt, grad_sync = build_parallel(cfg, topo)
    first = train_steps(model, opt, grad_sync, topo, batches[:1])
    save_checkpoint(f"{root}/step_1", model, opt, {"step": 1}, topo)
    written = os.path.getsize(f"{root}/step_1/__{rank}_0.distcp")
    owned = _owned_elements(grad_sync) * BYTES_PER_ELEMENT

    topo = Topology.build(ep=4, model_cfg=cfg, seq_len=SEQ_LEN)  # DP=4 for the dense part
    model, opt, grad_sync = build_parallel(cfg, topo)
    extra = load_checkpoint(f"{root}/step_1", model, opt, topo)
    second = train_steps(model, opt, grad_sync, topo, batches[1:2])
    save_checkpoint(f"{root}/step_2", model, opt, {"step": 2}, topo)
    return first["losses"] + second["losses"], first["norms"] + second["norms"], extra, written, owned


def test_resume_across_layouts(tmp_path):
    cfg = tiny_config(capacity_factor=None, aux_loss_coef=0.0)  # EP's global router equals one process then
    batches = make_batches(cfg, micro_batches=4)  # EP=4 leaves the dense part DP=4
    ref = reference_run(cfg, batches)
    results = run_distributed(_tp2cp2_then_ep4, 4, cfg, batches, str(tmp_path))
    losses, norms, extra, _, _ = results[0]
    assert extra == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]  # no temp folders left
    assert (tmp_path / "step_2" / "complete").is_file()
    whole = sum(p.numel() for p in reference_model_params(cfg)) * BYTES_PER_ELEMENT
    for rank, (*_, written, owned) in enumerate(results):
        # a rank writes at most what it owns (replicas are written once; DCP adds a few hundred bytes per piece)
        # and owns well under half the state
        assert written <= 1.25 * owned + 16384, (rank, written, owned)
        assert owned < 0.4 * whole, (rank, owned, whole)

    # A single process (no torch.distributed) resumes the EP=4 checkpoint and runs the last step.
    from parallel.checkpoint import load_checkpoint
    from parallel.topology import Topology

    topo = Topology.build(model_cfg=cfg, seq_len=SEQ_LEN)
    model, opt, grad_sync = build_parallel(cfg, topo)
    assert load_checkpoint(tmp_path / "step_2", model, opt, topo) == {"step": 2}
    last = train_steps(model, opt, grad_sync, topo, batches[2:])
    got = {"losses": losses + last["losses"], "norms": norms + last["norms"], "grads": {}, "params": last["params"]}
    assert_matches({**ref, "grads": {}}, got, "TP2xCP2 -> EP4 -> single")


def reference_model_params(cfg):
    from test_tensor_parallel import build_model

    return list(build_model(cfg).parameters())


def test_incomplete_checkpoint_is_refused(tmp_path):
    from parallel.checkpoint import load_checkpoint, save_checkpoint
    from parallel.topology import Topology

    cfg = tiny_config()
    topo = Topology.build(model_cfg=cfg)
    model, opt, _ = build_parallel(cfg, topo)
    path = save_checkpoint(tmp_path / "step_5", model, opt, {"a": 1}, topo)
    (path / "complete").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(path, model, opt, topo)
    # re-saving the same step replaces the folder atomically and leaves no temp folders
    save_checkpoint(tmp_path / "step_5", model, opt, {"a": 2}, topo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_5"]
    assert load_checkpoint(path, model, opt, topo) == {"a": 2}
