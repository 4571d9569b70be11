"""Unit tests of the trainer's parts: LR and batch schedules, atomic checkpoints, logging outputs, config."""

import itertools
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, compose_config
from trainer.logger import RunLogger, truncate_metrics, wandb_has_credentials
from trainer.metrics import throughput
from trainer.schedules import BatchSchedule, LRSchedule

REPO = Path(__file__).resolve().parent.parent


# ---- LR schedule ------------------------------------------------------------------------------------------

def test_lr_warmup_constant_drop_and_exponential_decay():
    lr_cfg = {"warmup_steps": 10, "drop_ratio": 0.65, "drop_at_step": 50, "drop_at_tokens": None, "decay_steps": 20,
                  "min_ratio": 0.15}
    lr = LRSchedule.from_config(2e-4, 100, lr_cfg)
    assert lr(1, 0) == pytest.approx(2e-5)
    assert lr(10, 0) == pytest.approx(2e-4)  # peak at the end of warmup
    assert lr(11, 0) == lr(50, 0) == pytest.approx(2e-4)  # constant
    assert lr(51, 0) == pytest.approx(1.3e-4)  # the step down
    assert lr(80, 0) == pytest.approx(1.3e-4)  # decay starts after step 80
    assert lr(100, 0) == pytest.approx(3e-5)  # ends at the floor
    assert lr(90, 0) == pytest.approx(math.sqrt(1.3e-4 * 3e-5))  # exponential: geometric mean halfway
    values = [lr(s, 0) for s in range(81, 101)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_lr_drop_by_tokens():
    lr = LRSchedule.from_config(1.0, 10, {"warmup_steps": 0, "drop_ratio": 0.5, "drop_at_tokens": 1000})
    assert lr(3, 999) == 1.0 and lr(3, 1000) == 0.5


@pytest.mark.parametrize("lr_cfg, needle", [
    ({"warmup_steps": 8, "decay_steps": 5}, "exceed trainer.steps"),
    ({"drop_ratio": 1.5}, "drop_ratio"),
    ({"drop_at_step": 3, "drop_at_tokens": 5}, "not both"),
])
def test_lr_schedule_rejects_bad_settings(lr_cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        LRSchedule.from_config(1.0, 10, lr_cfg)


# ---- batch-size warmup ------------------------------------------------------------------------------------

def test_batch_schedule_full_preset_thresholds():
    cfg = OmegaConf.load(REPO / "conf/schedule/minimax_text_01.yaml")
    sched = BatchSchedule.from_config(cfg.batch)
    M = 2**20
    assert sched.global_batch_tokens(0) == 16 * M
    assert sched.global_batch_tokens(69_000_000_000 - 1) == 16 * M
    assert sched.global_batch_tokens(69_000_000_000) == 32 * M
    assert sched.global_batch_tokens(790_000_000_000) == 64 * M
    assert sched.global_batch_tokens(4_700_000_000_000) == 128 * M
    sched.check_divisible(micro_batch_size=1, seq_len=8192, dp=64)
    assert sched.micro_batches_per_rank(0, 1, 8192, 64) == 32
    assert sched.micro_batches_per_rank(4_700_000_000_000, 1, 8192, 64) == 256


def test_batch_schedule_rejects_bad_settings():
    with pytest.raises(ConfigError, match=r"schedule.batch\[1\].global_batch_tokens=3000 is not divisible"):
        BatchSchedule.from_config([{"tokens": 0, "global_batch_tokens": 2048},
                                   {"tokens": 10, "global_batch_tokens": 3000}]).check_divisible(4, 256, 1)
    with pytest.raises(ConfigError, match="first entry has tokens: 0"):
        BatchSchedule.from_config([{"tokens": 5, "global_batch_tokens": 2048}])
    with pytest.raises(ConfigError, match="must increase"):
        BatchSchedule.from_config([{"tokens": 0, "global_batch_tokens": 1}, {"tokens": 0, "global_batch_tokens": 2}])


# ---- atomic checkpoints -----------------------------------------------------------------------------------

STATE = "state.pt"  # these tests exercise the folder scheme only: a stand-in for the DCP state


def _save(root, step, keep_last=0, value=0.0, write=None):
    tmp = ckpt.begin_save(root, step)
    (write or _write)(tmp, value)
    return ckpt.finish_save(root, step, tmp, "a: 1\n", {}, keep_last)


def _write(tmp, value):
    torch.save({"x": torch.tensor([value])}, tmp / STATE)


def _value(path):
    return torch.load(path / STATE)["x"].item()


def test_checkpoint_is_complete_after_save_and_keep_last_prunes(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=2, value=step)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert (latest / ckpt.MARKER).exists() and (latest / "config.yaml").read_text() == "a: 1\n"
    assert _value(latest) == 3.0
    assert json.loads((latest / "meta.json").read_text())["step"] == 3
    assert not list(tmp_path.glob(".tmp-*"))


def test_crash_mid_save_leaves_no_loadable_checkpoint(tmp_path):
    _save(tmp_path, 1, keep_last=1, value=1.0)

    def crash(tmp_dir, value):
        (tmp_dir / STATE).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError):
        _save(tmp_path, 2, keep_last=1, write=crash)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000001"]  # older one kept
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_000001"
    _save(tmp_path, 2, keep_last=1, value=2.0)  # the next save clears the leftover temp dir
    assert not list(tmp_path.glob(".tmp-*"))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000002"]


def test_resume_resolution(tmp_path):
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None  # nothing yet: fresh start
    (tmp_path / "step_000007").mkdir()  # no marker
    with pytest.raises(ConfigError, match="trainer.resume"):
        ckpt.resolve_resume(str(tmp_path / "step_000007"), tmp_path)
    good = _save(tmp_path, 5)
    assert ckpt.resolve_resume(str(good), tmp_path) == good
    assert ckpt.resolve_resume(str(tmp_path), tmp_path) == good  # a folder of checkpoints: its newest
    assert ckpt.resolve_resume("auto", tmp_path) == good


# ---- logging outputs --------------------------------------------------------------------------------------

def _log_cfg(tmp_path, mode):
    return OmegaConf.create({
        "trainer": {"name": "t", "steps": 2, "log_every": 1},
        "logging": {"progress_bar": False, "metrics_file": "metrics.jsonl",
                    "wandb": {"mode": mode, "project": "p", "entity": None, "name": None, "tags": []}}})


ROW = {"step": 1, "tokens": 10, "loss": 1.0, "aux_loss": 0.0, "drop_rate": 0.0, "grad_norm": 1.0, "lr": 1e-3, "global_batch_tokens": 10,
           "tokens_per_s": 1.0, "tflops_per_device": 0.0, "mfu": 0.0, "memory_gib": 0.1}


def test_disabled_wandb_is_never_imported(tmp_path):
    cfg_json = json.dumps(OmegaConf.to_container(_log_cfg(tmp_path, "disabled")))
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom omegaconf import OmegaConf\n"
        "from trainer.logger import RunLogger\n"
        f"log = RunLogger(OmegaConf.create({cfg_json!r}), Path({str(tmp_path)!r}), True, 0)\n"
        f"row = json.loads({json.dumps(ROW)!r}); row['mfu'] = float('nan')\n"
        "log.log_step(row); log.close()\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["mfu"] is None and row["loss"] == 1.0  # NaN becomes null: the file stays valid JSON


def test_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert not wandb_has_credentials()
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                      finish=lambda **k: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = RunLogger(_log_cfg(tmp_path, "online"), tmp_path, True, 0)
    log.close()
    assert calls and calls[0]["mode"] == "offline" and calls[0]["dir"] == str(tmp_path)
    assert "offline" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_has_credentials()


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


# ---- config, optimizer, metrics ---------------------------------------------------------------------------

def test_default_config_composes_with_all_groups():
    cfg = compose_config([])
    assert set(cfg) >= {"model", "data", "optim", "schedule", "parallel", "stage", "logging", "trainer"}
    assert "hydra" not in cfg
    assert cfg.trainer.name == "tiny" and cfg.trainer.run_dir == "outputs/tiny"
    assert compose_config(["model=small"]).trainer.run_dir == "outputs/small"
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0


def test_throughput_and_mfu():
    m = throughput(tokens=1000, seconds=2.0, flops_per_token=6e9, world_size=2, peak=1.5)
    assert m["tokens_per_s"] == 500 and m["tflops_per_device"] == pytest.approx(1.5) and m["mfu"] == pytest.approx(1)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    from trainer import checkpoint as ckpt

    for step in (100, 200, 300):
        _save(tmp_path, step, value=step)
    # a run resumed from step 100 saves step 150 with keep_last=2: 100 and 150 stay; 200 and 300 are kept
    # under another name so that resume=auto continues this run, not the abandoned one
    _save(tmp_path, 150, keep_last=2, value=150)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000100", "step_000150"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_000150"
    assert (tmp_path / "abandoned-step_000300").is_dir() and (tmp_path / "abandoned-step_000200").is_dir()
    # that run goes on to 200 and is rolled back to 150 again: the second branch's 200 and 150 are set aside too
    _save(tmp_path, 200, value=201)
    _save(tmp_path, 150, value=151)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000100", "step_000150"]
    assert _value(tmp_path / "step_000150") == 151
    assert _value(tmp_path / "abandoned-step_000200-2") == 201
    assert _value(tmp_path / "abandoned-step_000150") == 150
