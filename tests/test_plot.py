"""`python -m trainer.plot`: one valid PNG per panel with the series the run logged, validation rows included;
one-line errors and nothing written for bad input; the wall-clock `time` of RunLogger's rows."""

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from trainer.config import EXIT_BAD_INPUT
from trainer.logger import RunLogger
from trainer.plot import main, write_plots

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_row(step: int) -> dict:
    """The keys of trainer/loop.py's train_step (batch doubles after step 2), as RunLogger writes them."""
    batch = 128 if step <= 2 else 256
    return {"step": step, "tokens": 128 * min(step, 2) + 256 * max(step - 2, 0), "loss": 5.0 / step,
            "aux_loss": 0.01, "drop_rate": 0.02 * step, "moe/load_share_min": 0.2, "moe/load_share_max": 0.3,
            "moe/load_share_mean": 0.25, "grad_norm": 2.0 / step, "lr": 1e-3 * step, "global_batch_tokens": batch,
            "micro_batches": batch // 128, "label_tokens": batch - 2, "step_time_s": 0.1, "tokens_per_s": 1000.0 * step,
            "tflops_per_device": 0.1, "mfu": 0.2, "memory_gib": 0.0, "time": 1.7e9 + step}


def write_metrics(run_dir: Path, rows: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_every_panel_is_a_png_of_its_series(tmp_path):
    rows = [train_row(s) for s in range(1, 5)]
    rows[1] |= {"val/loss": 2.6, "val/ppl": 13.5}  # validation on a training row ...
    rows.append({"step": 4, "val/loss": 1.4, "val/ppl": 4.1})  # ... or on a row of its own, without tokens
    write_metrics(tmp_path, rows, tail='{"step": 5, "lo')  # a line cut short by a crash
    written = write_plots(tmp_path)
    assert written == {
        "loss.png": ["loss", "val/loss"], "val_ppl.png": ["val/ppl"], "lr.png": ["lr"],
        "global_batch_tokens.png": ["global_batch_tokens"], "tokens_per_s.png": ["tokens_per_s"], "mfu.png": ["mfu"],
        "drop_rate.png": ["drop_rate"], "grad_norm.png": ["grad_norm"], "aux_loss.png": ["aux_loss"],
        "expert_load.png": ["moe/load_share_max", "moe/load_share_mean", "moe/load_share_min"]}
    plots = tmp_path / "plots"
    assert sorted(p.name for p in plots.iterdir()) == sorted(written)  # no temporary files left
    for name in written:
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC
        with Image.open(plots / name) as image:
            image.verify()


def test_missing_and_non_finite_keys_are_skipped(tmp_path):
    write_metrics(tmp_path, [{"step": s, "tokens": 64 * s, "loss": 3.0, "mfu": None} for s in (1, 2)])
    assert write_plots(tmp_path, tmp_path / "out") == {"loss.png": ["loss"]}  # mfu is null: NaN without a peak
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["loss.png"]


def test_cli_writes_to_out(tmp_path):
    write_metrics(tmp_path / "run", [train_row(s) for s in (1, 2, 3)])
    proc = subprocess.run([sys.executable, "-m", "trainer.plot", str(tmp_path / "run"), f"out={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 9 plots" in proc.stdout and (tmp_path / "o" / "loss.png").is_file()
    assert not (tmp_path / "run" / "plots").exists()


@pytest.mark.parametrize("case", ["no_args", "no_dir", "a_file", "no_metrics", "empty", "only_garbage",
                                  "no_known_keys", "bad_arg", "out_is_a_file"])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [train_row(1)])
    args = [str(run_dir)]
    if case == "no_args":
        args = []
    elif case == "no_dir":
        args = [str(tmp_path / "missing")]
    elif case == "a_file":
        args = [str(run_dir / "metrics.jsonl")]
    elif case == "no_metrics":
        (run_dir / "metrics.jsonl").unlink()
    elif case == "empty":
        write_metrics(run_dir, [])
    elif case == "only_garbage":
        write_metrics(run_dir, [], tail='[1, 2]\n{"step": 1, "lo')
    elif case == "no_known_keys":
        write_metrics(run_dir, [{"step": 1, "tokens": 8, "other": 1.0}])
    elif case == "bad_arg":
        args.append("dpi=300")
    elif case == "out_is_a_file":
        (tmp_path / "taken").write_text("")
        args.append(f"out={tmp_path / 'taken'}")
    assert main(args) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert not (run_dir / "plots").exists()


def test_run_logger_rows_carry_wall_clock_time(tmp_path, monkeypatch):
    logged = {}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: logged.update(init=kw) or types.SimpleNamespace(
        log=lambda row, step: logged.update(row=row), finish=lambda **k: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = OmegaConf.create({
        "trainer": {"name": "t", "steps": 100, "log_every": 100, "lr": "${logging.lr}"},
        "logging": {"lr": 0.5, "progress_bar": False, "metrics_file": "metrics.jsonl",
                    "wandb": {"mode": "online", "project": "p", "entity": None, "name": None, "tags": []}}})
    metrics = {k: v for k, v in train_row(1).items() if k != "time"}  # as train_step returns them
    log = RunLogger(cfg, tmp_path, True, 0)
    before = time.time()
    log.log_step(metrics)
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert isinstance(row["time"], float) and before <= row["time"] <= time.time()
    assert {k: v for k, v in row.items() if k != "time"} == metrics  # the rest unchanged
    assert logged["row"] == {k: v for k, v in metrics.items() if k != "step"}  # wandb keeps its own timestamps
    assert logged["init"]["config"]["trainer"]["lr"] == 0.5  # the resolved config
