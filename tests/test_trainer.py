"""End-to-end trainer tests on a micro model (CPU): loss goes down, resume is exact, the batch-size switch,
non-finite loss handling, atomic checkpoints, and one-line errors for bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.train import EXIT_BAD_INPUT, EXIT_NON_FINITE, main_from_overrides

REPO = Path(__file__).resolve().parent.parent

# Two layers (one lightning, one softmax), 4 experts; runs a step in well under a second on one core.
MICRO = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.head_dim=16",
    "model.num_kv_heads=1", "model.num_experts=4", "model.ffn_hidden_size=64", "model.softmax_period=2",
    "stage.seq_len=64", "trainer.micro_batch_size=2", "trainer.log_every=1000",
    "logging.wandb.mode=disabled", "logging.plots=false", "logging.progress_bar=false",
    "schedule.lr.warmup_steps=2", "schedule.lr.decay_steps=0", "schedule.lr.drop_at_step=null",
]
# 128 tokens (1 micro-batch) per step until 640 tokens were seen, then 256 (2 micro-batches).
SWITCH_AT = 640
BATCH = [f"schedule.batch=[{{tokens:0,global_batch_tokens:128}},{{tokens:{SWITCH_AT},global_batch_tokens:256}}]"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def train(run_dir: Path, *overrides: str) -> int:
    return main_from_overrides([*MICRO, *BATCH, f"trainer.run_dir={run_dir}", *overrides])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(run_dir: Path) -> list[str]:
    return [p.name for p in ckpt.complete_checkpoints(run_dir / "checkpoints")]


def digest(path: Path) -> str:
    """Of the tensor data (DCP's .distcp files): equal digests mean bitwise-equal model and optimizer state."""
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(path.glob("*.distcp")))).hexdigest()


def extra(path: Path) -> dict:
    return torch.load(path / "extra.pt", weights_only=False)


# ---- training works --------------------------------------------------------------------------------------

def test_tiny_run_lowers_loss(tmp_path):
    run_dir = tmp_path / "run"
    rc = train(run_dir, "trainer.steps=40", "stage.seq_len=128", "trainer.micro_batch_size=4",
               "schedule.batch=[{tokens:0,global_batch_tokens:1024}]", "trainer.checkpoint.every=0",
               "logging.plots=true")
    assert rc == 0
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last)
    assert checkpoint_steps(run_dir) == ["step_000040"]
    row = metrics(run_dir)[-1]
    for key in ("loss", "aux_loss", "drop_rate", "grad_norm", "lr", "global_batch_tokens", "tokens_per_s",
                "tflops_per_device", "mfu", "memory_gib"):
        assert isinstance(row[key], (int, float)), key
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "plots" / "loss.png").is_file()  # written when the run ends


def test_no_checkpoint_when_at_end_is_off(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "trainer.steps=2", "trainer.checkpoint.every=0", "trainer.checkpoint.at_end=false") == 0
    assert len(metrics(run_dir)) == 2 and checkpoint_steps(run_dir) == []


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps in one go, checkpoints every 4 (keep_last=1 leaves only the final one)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert train(run_dir, "trainer.steps=8", "trainer.checkpoint.every=4", "trainer.checkpoint.keep_last=1") == 0
    return run_dir


def test_batch_size_switch_at_configured_tokens(straight_run):
    rows = metrics(straight_run)
    tokens_before = 0
    for row in rows:
        expected = 128 if tokens_before < SWITCH_AT else 256
        assert row["global_batch_tokens"] == expected, row
        assert row["micro_batches"] == expected // 128
        tokens_before += row["global_batch_tokens"]
        assert row["tokens"] == tokens_before
    assert [r["global_batch_tokens"] for r in rows] == [128] * 5 + [256] * 3


def test_resume_gives_identical_losses(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "trainer.steps=4", "trainer.checkpoint.every=0") == 0
    assert checkpoint_steps(run_dir) == ["step_000004"]
    assert train(run_dir, "trainer.steps=8", "trainer.resume=auto", "trainer.checkpoint.every=0") == 0
    resumed = metrics(run_dir)
    straight = metrics(straight_run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        for key in ("loss", "aux_loss", "grad_norm", "lr", "global_batch_tokens", "tokens"):
            assert a[key] == b[key], (a["step"], key)  # bitwise: same ops, same order, same data
    assert checkpoint_steps(straight_run) == ["step_000008"]  # keep_last=1 pruned step 4
    final_a, final_b = (ckpt.latest_checkpoint(r / "checkpoints") for r in (straight_run, run_dir))
    assert extra(final_a)["trainer"] == extra(final_b)["trainer"] and extra(final_a)["data"] == extra(final_b)["data"]
    assert digest(final_a) == digest(final_b)


def test_async_checkpoints_equal_sync_ones(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "trainer.steps=8", "trainer.checkpoint.every=4", "trainer.checkpoint.keep_last=1",
                 "trainer.checkpoint.async=true") == 0
    assert checkpoint_steps(run_dir) == ["step_000008"] and not list((run_dir / "checkpoints").glob(".tmp-*"))
    final = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert digest(final) == digest(ckpt.latest_checkpoint(straight_run / "checkpoints"))


KILL_DURING_SECOND_ASYNC_SAVE = """
import os, sys
import parallel.checkpoint as pc
real, calls = pc.dcp.async_save, []
def save_then_die(*args, **kwargs):
    future = real(*args, **kwargs)
    calls.append(future)
    if len(calls) == 2:
        os._exit(9)  # killed while the background write of the second checkpoint is in flight
    return future
pc.dcp.async_save = save_then_die
from trainer.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_async_save_leaves_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*MICRO, *BATCH, f"trainer.run_dir={run_dir}", "trainer.steps=8", "trainer.checkpoint.every=4",
            "trainer.checkpoint.async=true"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_ASYNC_SAVE, *args], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert checkpoint_steps(run_dir) == ["step_000004"]  # the one in flight never became a checkpoint
    assert train(run_dir, *args[len(MICRO) + len(BATCH) + 1:], "trainer.resume=auto") == 0
    assert [m["step"] for m in metrics(run_dir)][-4:] == [5, 6, 7, 8]


def test_resume_auto_ignores_incomplete_checkpoints(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    root = run_dir / "checkpoints"
    (root / ".tmp-step_000012").mkdir()  # a crash mid-save ...
    (root / ".tmp-step_000012" / "extra.pt").write_bytes(b"partial")
    (root / "step_000010").mkdir()  # ... or a folder without the marker
    (root / "step_000010" / "extra.pt").write_bytes(b"partial")
    assert ckpt.resolve_resume("auto", root).name == "step_000008"
    # nothing left to do at step 8 of 8: resumes from the complete one and exits cleanly
    assert train(run_dir, "trainer.steps=8", "trainer.resume=auto") == 0
    assert len(metrics(run_dir)) == 8


def test_a_failed_resume_leaves_the_run_as_it_was(straight_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    config = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    assert train(run_dir, "trainer.steps=12", "trainer.resume=auto", "model.num_experts=8") == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: trainer.resume: cannot load "), err
    assert (run_dir / "config.yaml").read_bytes() == config
    assert len(metrics(run_dir)) == 8


def test_non_finite_loss_stops_and_keeps_last_checkpoint(straight_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    good = ckpt.latest_checkpoint(run_dir / "checkpoints")
    before = digest(good)
    capsys.readouterr()
    # a huge LR blows the weights up in step 9, so step 10's loss is not finite
    rc = train(run_dir, "trainer.steps=12", "trainer.resume=auto", "optim.lr=1e30", "schedule.lr.warmup_steps=0",
               "trainer.checkpoint.every=0")
    err = capsys.readouterr().err
    assert rc == EXIT_NON_FINITE
    assert "non-finite" in err and "step 10" in err, err
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert checkpoint_steps(run_dir) == ["step_000008"] and digest(good) == before
    assert extra(good)["trainer"]["step"] == 8


def test_skip_drops_the_update_of_a_non_finite_step(tmp_path, monkeypatch):
    from trainer.loop import Trainer

    judge = Trainer._non_finite
    monkeypatch.setattr(Trainer, "_non_finite", staticmethod(  # step 3's loss reads as NaN
        lambda step, loss, aux, norm: judge(step, float("nan") if step == 3 else loss, aux, norm)))
    run_dir = tmp_path / "run"
    assert train(run_dir, "trainer.steps=4", "trainer.on_nonfinite=skip", "trainer.checkpoint.every=1",
                 "trainer.checkpoint.keep_last=0") == 0
    assert [m["skipped_steps"] for m in metrics(run_dir)] == [0, 0, 1, 1]
    steps = {n: digest(run_dir / "checkpoints" / f"step_{n:06d}") for n in (2, 3, 4)}
    assert steps[3] == steps[2] != steps[4]  # weights and optimizer state untouched by the skipped step
    assert extra(run_dir / "checkpoints" / "step_000003")["trainer"]["skipped"] == 1


def test_profile_steps_write_a_trace(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "trainer.steps=2", "trainer.profile.steps=[2,2]", "trainer.checkpoint.at_end=false") == 0
    trace = json.loads((run_dir / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::") for name in names)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    import parallel.checkpoint

    save_state, calls = parallel.checkpoint.save_state, []

    def fill_the_disk(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:  # the second checkpoint finds the disk full half-way
            (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(directory, *args, **kwargs)

    monkeypatch.setattr(parallel.checkpoint, "save_state", fill_the_disk)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert train(run_dir, "trainer.steps=4", "trainer.checkpoint.every=2") == EXIT_BAD_INPUT
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint: cannot write {run_dir / 'checkpoints'}: No space "
                                               "left on device; this run's checkpoints need about "), err
    assert "Traceback" not in stderr
    assert checkpoint_steps(run_dir) == ["step_000002"] and not list((run_dir / "checkpoints").glob(".tmp-*"))


# ---- bad input: one line naming the setting, exit code 2, nothing written ---------------------------------

def _bad_inputs(tmp_path: Path):
    empty_dir = tmp_path / "empty_corpus"
    empty_dir.mkdir()
    bad_tokenizer = tmp_path / "tokenizer.json"
    bad_tokenizer.write_text("{ this is not a tokenizer")
    not_ckpt = tmp_path / "step_000001"
    not_ckpt.mkdir()
    return {
        "unknown key": (["trainer.stepz=3"], "trainer.stepz"),
        "unknown group option": (["model=nope"], "model=nope"),
        "bad value": (["trainer.device=tpu"], "trainer.device"),
        "missing data path": (["data.source=files", f"data.path={tmp_path / 'nope.jsonl'}"], "data.path"),
        "empty data path": (["data.source=files", f"data.path={empty_dir}"], "data.path"),
        "unreadable tokenizer": ([f"data.tokenizer={bad_tokenizer}"], "data.tokenizer"),
        "batch not divisible": (["stage.seq_len=96"], "global_batch_tokens"),
        "vocab too small": (["model.vocab_size=100"], "model.vocab_size"),
        "invalid model config": (["model.num_kv_heads=3"], "model.num_heads"),
        "unknown model key": (["+model.bogus=1"], "bogus"),
        "schedule too long": (["trainer.steps=3", "schedule.lr.warmup_steps=5"], "schedule.lr.warmup_steps"),
        "resume not a checkpoint": ([f"trainer.resume={not_ckpt}"], "trainer.resume"),
        "layout needs more ranks": (["parallel=tp2"], "not divisible by tp*cp*pp=2"),
        "bad router mode": (["parallel=dp", "parallel.router_mode=best"], "parallel.router_mode"),
        "bad at_end": (["trainer.checkpoint.at_end=maybe"], "trainer.checkpoint.at_end"),
        "no document passes the length filter": (["data.min_doc_tokens=100000000"], "data.min_doc_tokens"),
        "bad profile steps": (["trainer.profile.steps=[3,2]"], "trainer.profile.steps"),
        "bad on_nonfinite": (["trainer.on_nonfinite=rollback"], "trainer.on_nonfinite"),
    }


BAD_CASES = ["unknown key", "unknown group option", "bad value", "missing data path", "empty data path",
             "unreadable tokenizer", "batch not divisible", "vocab too small", "invalid model config",
             "unknown model key", "schedule too long", "resume not a checkpoint", "layout needs more ranks",
             "bad router mode", "bad at_end", "no document passes the length filter", "bad profile steps",
             "bad on_nonfinite"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_and_nothing_written(case, tmp_path, capsys):
    overrides, needle = _bad_inputs(tmp_path)[case]
    run_dir = tmp_path / "run"
    capsys.readouterr()
    rc = train(run_dir, "trainer.steps=4", *overrides)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == EXIT_BAD_INPUT
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle in lines[0], lines[0]
    assert not run_dir.exists()


def test_existing_run_without_resume_is_refused(straight_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train(run_dir, "trainer.steps=8") == EXIT_BAD_INPUT
    assert "trainer.resume=auto" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_cli_prints_one_line_without_traceback(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "trainer.stepz=1", f"trainer.run_dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == [
        "error: config: unknown key 'trainer.stepz' (not in conf/; use +trainer.stepz=... only to add a new key)"]
    assert proc.stdout == "" and not run_dir.exists()


# ---- torchrun: two CPU processes, plain data parallel -----------------------------------------------------

def test_torchrun_two_processes_match_single_process(tmp_path):
    # micro_batch_size=1 so that every global batch splits over 2 ranks (128 tokens = 2 windows of 64)
    common = [*MICRO, *BATCH, "trainer.micro_batch_size=1", "trainer.steps=6", "trainer.checkpoint.every=3",
              "trainer.checkpoint.keep_last=1"]
    single_dir, dp_dir = tmp_path / "single", tmp_path / "dp"
    assert main_from_overrides([*common, f"trainer.run_dir={single_dir}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "trainer.train", *common, f"trainer.run_dir={dp_dir}", "trainer.checkpoint.async=true"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank takes half of every global batch; summed gradients give the single-process step
    single, dp = metrics(single_dir), metrics(dp_dir)
    assert len(dp) == 6  # rank 0 alone writes
    for a, b in zip(single, dp):
        assert b["global_batch_tokens"] == a["global_batch_tokens"] and b["micro_batches"] == a["micro_batches"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
        # every rank's step time: the slowest shows
        assert b["step_time_median_s"] <= b["step_time_max_s"] and b["step_time_slowest_rank"] in (0, 1)
    assert checkpoint_steps(dp_dir) == ["step_000006"]
