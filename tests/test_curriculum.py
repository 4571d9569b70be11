"""The curriculum on a micro model (CPU): the batch size switched by the smoothed loss (once, at the documented
step, kept over a resume), validation on held-out documents (the same val/loss in one process, under DP=2,
TP=2 and CP=2; training unchanged by it), a long-context mixture moving between stages' weights, and one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_harness import run_distributed
from test_trainer_parallel import job as parallel_job

from data.documents import Holdout, epoch_order
from trainer.schedules import LOSS_EMA, LOSS_SWITCH_DELAY
from trainer.train import EXIT_BAD_INPUT, main_from_overrides

LOSS_BELOW = 8.335  # the micro model's smoothed loss passes it within a few steps
SWITCH = [f"schedule.batch=[{{tokens:0,global_batch_tokens:128}},{{loss_below:{LOSS_BELOW},global_batch_tokens:256}}]"]
EVAL = ["eval.every=2", "eval.windows=4", "eval.data.holdout=0.2"]
LAYOUTS = {"dp2": "parallel=dp", "tp2": "parallel=tp2", "cp2": "parallel=cp2"}  # on 2 ranks
# 128 tokens a step; the weights of `a` move from 0 to 0.75 over the first 512 tokens (steps 1-5)
MIXTURE = ["stage.mixture={a:{max_doc_tokens:300,weight:0.75},b:{min_doc_tokens:300,weight:0.25}}",
           "stage.previous_mixture={a:0,b:1}", "stage.transition_tokens=512"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def job(run_dir: Path, *overrides: str) -> list[str]:
    # two sub-streams: a resume refills each sub-stream's buffer, which is what would dominate these tests' time
    return parallel_job(run_dir, "data.streams=2", *overrides)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def _train_jobs(rank, world_size, jobs):
    return [main_from_overrides(overrides) for overrides in jobs]


def test_loss_switch_fires_once_at_its_step_and_survives_resume(tmp_path):
    every_step = ["trainer.checkpoint.every=1", "trainer.checkpoint.keep_last=0"]
    assert main_from_overrides(job(tmp_path / "a", *SWITCH, "trainer.steps=10", *every_step)) == 0
    straight = rows(tmp_path / "a")
    ema = None
    for row in straight:  # the documented smoothing, from the first step's loss
        ema = row["loss"] if ema is None else LOSS_EMA * ema + (1 - LOSS_EMA) * row["loss"]
        assert row["batch/loss_ema"] == pytest.approx(ema, rel=1e-12)
    decided = next(r["step"] for r in straight if r["batch/loss_ema"] < LOSS_BELOW)
    first = decided + 1 + LOSS_SWITCH_DELAY
    assert first < 10, "the smoothed loss fell too late for this test"
    assert [r["step"] for r in straight if "batch/switch_step" in r] == [decided]
    assert straight[decided - 1]["batch/switch_step"] == first
    assert [r["global_batch_tokens"] for r in straight] == [128] * (first - 1) + [256] * (11 - first)

    # from the checkpoint between the decision and its step: neither a second switch nor a forgotten one
    resumed_dir = tmp_path / "resumed"
    assert main_from_overrides(job(resumed_dir, *SWITCH, "trainer.steps=10",
                                   f"trainer.resume={checkpoint(tmp_path / 'a', decided + 1)}")) == 0
    resumed = rows(resumed_dir)
    assert [r["step"] for r in resumed] == list(range(decided + 2, 11))
    assert not any("batch/switch_step" in r for r in resumed)
    for a, b in zip(straight[decided + 1:], resumed):
        for key in ("loss", "global_batch_tokens", "tokens", "batch/loss_ema"):
            assert a[key] == b[key], (a["step"], key)


def test_validation_is_the_same_under_every_layout_and_leaves_training_alone(tmp_path):
    assert main_from_overrides(job(tmp_path / "single", *EVAL, "trainer.steps=4")) == 0
    assert main_from_overrides(job(tmp_path / "no_eval", *EVAL, "eval.every=0", "trainer.steps=4")) == 0
    rcs = run_distributed(_train_jobs, 2, [job(tmp_path / name, *EVAL, layout, "trainer.steps=2")
                                           for name, layout in LAYOUTS.items()])
    assert rcs[0] == [0] * len(LAYOUTS), rcs
    single = rows(tmp_path / "single")
    assert [r["step"] for r in single if "val/loss" in r] == [2, 4]
    assert single[1]["val/ppl"] == pytest.approx(np.exp(single[1]["val/loss"]))
    assert single[3]["val/loss"] < single[1]["val/loss"]
    assert [r["loss"] for r in single] == [r["loss"] for r in rows(tmp_path / "no_eval")]  # bitwise
    for layout in LAYOUTS:
        assert rows(tmp_path / layout)[1]["val/loss"] == pytest.approx(single[1]["val/loss"], rel=1e-5), layout


def test_held_out_documents_are_never_training_documents():
    held_out = Holdout(0.2, held_out=True)
    validation = set(epoch_order(0, 0, 0, 1, 1000, holdout=held_out).tolist())
    training = [set(epoch_order(0, 3, p, 4, 1000, holdout=Holdout(0.2)).tolist()) for p in range(4)]
    assert 150 < len(validation) < 250
    assert not validation & set().union(*training)
    assert validation | set().union(*training) == set(range(1000))


def test_mixture_moves_over_transition_tokens_and_resumes_alike(tmp_path):
    straight_dir = tmp_path / "straight"
    assert main_from_overrides(job(straight_dir, *MIXTURE, "trainer.steps=6", "trainer.checkpoint.every=1",
                                   "trainer.checkpoint.keep_last=0")) == 0
    straight = rows(straight_dir)
    for row in straight:
        a = 0.75 * min(1.0, (row["step"] - 1) * 128 / 512)
        assert row["data/weight/a"] == pytest.approx(a) and row["data/weight/b"] == pytest.approx(1 - a)
    # step 1 drew with weight 0 for `a`: both of its windows came from `b`
    data = torch.load(checkpoint(straight_dir, 1) / "extra.pt", weights_only=False)["data"]
    counts = [s["counts"] for s in data["sub_streams"].values()]
    assert sum(c["a"] for c in counts) == 0 and sum(c["b"] for c in counts) == 2
    resumed_dir = tmp_path / "resumed"
    assert main_from_overrides(job(resumed_dir, *MIXTURE, "trainer.steps=6",
                                   f"trainer.resume={checkpoint(straight_dir, 2)}")) == 0
    for a, b in zip(straight[2:], rows(resumed_dir), strict=True):
        assert (a["loss"], a["data/weight/a"]) == (b["loss"], b["data/weight/a"]), a["step"]


@pytest.mark.parametrize("overrides, message", [
    (["schedule.batch=[{tokens:0,global_batch_tokens:128},{loss_below:-1,global_batch_tokens:256}]"],
     "schedule.batch[1].loss_below=-1 must be a positive number"),
    (["schedule.batch=[{tokens:0,global_batch_tokens:128},{loss_below:abc,global_batch_tokens:256}]"],
     "schedule.batch[1].loss_below='abc' must be a positive number"),
    (["schedule.batch=[{tokens:0,global_batch_tokens:128},{tokens:10,loss_below:3,global_batch_tokens:256}]"],
     "schedule.batch[1] must have one of tokens and loss_below, not both"),
    ([*EVAL, "eval.windows=3", "trainer.micro_batch_size=2"], "eval.windows=3 is not divisible by trainer.micro_batch_size=2"),
    (["eval.every=5"], "eval.every=5 needs validation data"),
    (["stage.transition_tokens=100"], "the data is not a mixture"),
])
def test_bad_curriculum_settings_fail_in_one_line_before_writing(tmp_path, capfd, overrides, message):
    run_dir = tmp_path / "run"
    assert main_from_overrides(job(run_dir, *overrides)) == EXIT_BAD_INPUT
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run_dir.exists()
