"""Layout-independent checkpoints: TP=2,DP=1 -> TP=1,DP=2 -> 1 process continues the single-process run exactly."""

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


def _tp2_then_dp2(rank, world, cfg, batches, root):
    from parallel.checkpoint import load_checkpoint, save_checkpoint
    from parallel.topology import Topology

    topo = Topology.build(tp=2, sequence_parallel=True, model_cfg=cfg, seq_len=SEQ_LEN)
    model, opt, grad_sync = build_parallel(cfg, topo)
    first = train_steps(model, opt, grad_sync, topo, batches[:1])
    save_checkpoint(f"{root}/step_1", model, opt, {"step": 1}, topo)

    topo = Topology.build(tp=1, model_cfg=cfg, seq_len=SEQ_LEN)  # DP=2
    model, opt, grad_sync = build_parallel(cfg, topo)
    extra = load_checkpoint(f"{root}/step_1", model, opt, topo)
    second = train_steps(model, opt, grad_sync, topo, batches[1:2])
    save_checkpoint(f"{root}/step_2", model, opt, {"step": 2}, topo)
    return first["losses"] + second["losses"], first["norms"] + second["norms"], extra


def test_resume_across_layouts(tmp_path):
    cfg = tiny_config()
    batches = make_batches(cfg)
    ref = reference_run(cfg, batches)
    losses, norms, extra = run_distributed(_tp2_then_dp2, 2, cfg, batches, str(tmp_path))[0]
    assert extra == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]  # no temp folders left
    assert (tmp_path / "step_2" / "complete").is_file()

    # A single process (no torch.distributed) resumes the TP=1,DP=2 checkpoint and runs the last step.
    from parallel.checkpoint import load_checkpoint
    from parallel.topology import Topology

    topo = Topology.build(model_cfg=cfg, seq_len=SEQ_LEN)
    model, opt, grad_sync = build_parallel(cfg, topo)
    assert load_checkpoint(tmp_path / "step_2", model, opt, topo) == {"step": 2}
    last = train_steps(model, opt, grad_sync, topo, batches[2:])
    got = {"losses": losses + last["losses"], "norms": norms + last["norms"], "grads": {}, "params": last["params"]}
    assert_matches({**ref, "grads": {}}, got, "TP2 -> DP2 -> single")


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
