"""Checkpoint integrity: every file's checksum in `checksums.json` (sync, async and multi-rank saves), verified
before a load; a damaged checkpoint is one line and exit 2 (resume=auto falls back to the previous one),
resume=require needs a checkpoint, leftover temp folders go at the start."""

import json
import shutil
from pathlib import Path

import pytest
from dist_harness import run_distributed
from test_trainer import checkpoint_steps, metrics, train

from parallel.atomic_folder import MANIFEST, MARKER, checksum
from trainer.train import EXIT_BAD_INPUT

STEPS = ["trainer.steps=4", "trainer.checkpoint.every=2", "trainer.checkpoint.keep_last=0"]
FEW_STREAMS = "data.streams=4"  # a resume re-reads every stream's buffer: 4 instead of 64 saves seconds per run


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 steps, sync checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    assert train(run_dir, FEW_STREAMS, *STEPS) == 0
    assert checkpoint_steps(run_dir) == ["step_000002", "step_000004"]
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(data)


def listing(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def assert_manifest_matches(ckpt_dir: Path) -> None:
    files = json.loads((ckpt_dir / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in ckpt_dir.iterdir()} - {MANIFEST, MARKER}
    assert set(files) == on_disk and any(n.endswith(".distcp") for n in files), (sorted(files), sorted(on_disk))
    assert all(checksum(ckpt_dir / name) == entry for name, entry in files.items())


def test_sync_and_async_saves_record_every_file(straight_run, tmp_path):
    for ckpt_dir in (straight_run / "checkpoints").iterdir():
        assert_manifest_matches(ckpt_dir)
    run_dir = tmp_path / "async"
    assert train(run_dir, FEW_STREAMS, "trainer.steps=2", "trainer.checkpoint.every=1", "trainer.checkpoint.keep_last=0",
                 "trainer.checkpoint.async=true") == 0
    assert checkpoint_steps(run_dir) == ["step_000001", "step_000002"]
    for ckpt_dir in (run_dir / "checkpoints").iterdir():
        assert_manifest_matches(ckpt_dir)


def test_flipped_byte_is_one_line_and_nothing_written(straight_run, tmp_path, capsys):
    run_dir = copy_run(straight_run, tmp_path)
    newest = run_dir / "checkpoints" / "step_000004"
    flip_byte(newest / "__0_0.distcp")
    before = listing(run_dir)
    capsys.readouterr()
    assert train(run_dir, FEW_STREAMS, "trainer.steps=6", f"trainer.resume={newest}") == EXIT_BAD_INPUT
    assert one_error_line(capsys) == (f"error: trainer.resume: checkpoint {newest} is damaged: "
                                      f"__0_0.distcp checksum mismatch")
    assert listing(run_dir) == before


def test_missing_shard_is_one_line(straight_run, tmp_path, capsys):
    run_dir = copy_run(straight_run, tmp_path)
    newest = run_dir / "checkpoints" / "step_000004"
    (newest / "__0_0.distcp").unlink()
    capsys.readouterr()
    assert train(run_dir, FEW_STREAMS, "trainer.steps=6", f"trainer.resume={newest}") == EXIT_BAD_INPUT
    assert one_error_line(capsys).endswith(f"checkpoint {newest} is damaged: __0_0.distcp is missing")


def test_resume_auto_falls_back_past_a_damaged_checkpoint(straight_run, tmp_path, capsys):
    run_dir = copy_run(straight_run, tmp_path)
    root = run_dir / "checkpoints"
    flip_byte(root / "step_000004" / "extra.pt")
    capsys.readouterr()
    assert train(run_dir, FEW_STREAMS, *STEPS, "trainer.resume=auto") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    expected = (f"warning: trainer.resume: checkpoint {root / 'step_000004'} is damaged: extra.pt checksum mismatch; "
                f"resuming from the previous one, {root / 'step_000002'}")
    assert warnings == [expected]
    resumed, straight = metrics(run_dir), metrics(straight_run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # rows after step 2 were dropped and written again
    for a, b in zip(straight, resumed):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    # the damaged checkpoint is set aside when step 4 is written again
    assert checkpoint_steps(run_dir) == ["step_000002", "step_000004"] and (root / "abandoned-step_000004").is_dir()
    assert_manifest_matches(root / "step_000004")


def test_checkpoint_without_manifest_loads_with_a_warning(straight_run, tmp_path, capsys):
    run_dir = copy_run(straight_run, tmp_path)
    newest = run_dir / "checkpoints" / "step_000004"
    (newest / MANIFEST).unlink()  # as written before checksums were recorded
    capsys.readouterr()
    assert train(run_dir, FEW_STREAMS, "trainer.steps=4", f"trainer.resume={newest}") == 0  # nothing left to do at step 4
    assert f"warning: trainer.resume: checkpoint {newest} has no {MANIFEST}" in capsys.readouterr().err


def test_resume_require_needs_a_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(run_dir, FEW_STREAMS, "trainer.steps=4", "trainer.resume=require") == EXIT_BAD_INPUT
    assert "trainer.resume=require: no complete checkpoint in" in one_error_line(capsys)
    assert not run_dir.exists()


def test_resume_auto_fresh_start_says_so_and_removes_leftover_temp_folders(tmp_path, capsys):
    run_dir = tmp_path / "run"
    leftover = run_dir / "checkpoints" / ".tmp-step_000003"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"half a shard")
    capsys.readouterr()
    assert train(run_dir, FEW_STREAMS, "trainer.steps=2", "trainer.resume=auto", "trainer.checkpoint.at_end=false") == 0
    assert "trainer.resume=auto: no complete checkpoint in" in capsys.readouterr().err
    assert not leftover.exists() and len(metrics(run_dir)) == 2


def _two_ranks_save_and_verify(rank, world, root):
    """Sync and async saves of 2 ranks, then verification spread over them: rank r checks files r, r + 2, ..."""
    import torch.distributed as dist
    from test_tensor_parallel import build_parallel, tiny_config

    from parallel.atomic_folder import begin_folder, finish_folder, temp_folder
    from parallel.checkpoint import DamagedCheckpoint, save_checkpoint, save_state_async, verify_checkpoint
    from parallel.topology import Topology

    cfg = tiny_config()
    topo = Topology.build(model_cfg=cfg)  # DP=2: each rank writes its half of the optimizer state
    model, opt, _ = build_parallel(cfg, topo)
    save_checkpoint(f"{root}/step_1", model, opt, {"step": 1}, topo)
    path = Path(root, "step_2")
    tmp = begin_folder(path) if rank == 0 else temp_folder(path)
    dist.barrier()
    save_state_async(tmp, model, opt, {"step": 2}, topo, dist.new_group(backend="gloo")).result()
    if rank == 0:  # as trainer.layout completes an async save: rank 0 alone, no collective
        finish_folder(tmp, path)
    dist.barrier()
    verified = [verify_checkpoint(f"{root}/step_{s}") for s in (1, 2)]
    if rank == 1:  # sorted files: .metadata, __0_0.distcp, ... so rank 1 checks __0_0.distcp
        flip_byte(path / "__0_0.distcp")
    dist.barrier()
    with pytest.raises(DamagedCheckpoint) as damaged:
        verify_checkpoint(path)
    return verified, str(damaged.value)


def test_two_ranks_record_their_shards_and_agree_on_damage(tmp_path):
    results = run_distributed(_two_ranks_save_and_verify, 2, str(tmp_path))
    assert_manifest_matches(tmp_path / "step_1")
    for step in (1, 2):  # step 2 is the damaged one now
        names = json.loads((tmp_path / f"step_{step}" / MANIFEST).read_text())["files"]
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "extra.pt"} <= set(names)
        assert not list((tmp_path / f"step_{step}").glob("checksums-*"))  # the ranks' parts were merged
    assert results == [([True, True], f"checkpoint {tmp_path / 'step_2'} is damaged: __0_0.distcp checksum mismatch")] * 2
