"""The trainer on parallel/'s layouts (2 gloo ranks, fp32 CPU, micro model): every layout trains like one process.

One global batch = 2 windows of 64 tokens; capacity factor 1.0 drops tokens and aux_loss_coef=0.1 makes router
gradient errors visible in the loss and grad norm. Checked against the single-process run over 3 steps:
- tp=2 (SP), cp=2, dp=2 (distributed optimizer) and ep=2 with the local router rule: the plain single-process model;
- the global router (ep=2 over two DP ranks, and tp=2 x ep=2 over one micro-batch's SP halves) and the local
  rule under tp=2 x ep=2: the single process applying the same rule to the same two halves of its micro-batch,
  which proves the aux-loss convention of parallel/moe_parallel.py (a wrong router-gradient scale moves the
  grad norm by ~1%);
- resharding: a checkpoint written under tp=2 resumes under dp=2 and in one process (parallel=single), and a
  parallel=single checkpoint resumes under tp=2; the next step's loss equals the uninterrupted run's.
Runs are combined into two launches of 2 processes (the trainer leaves the harness's process group alone).
"""

import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed

import model.moe
from model.moe import switch_aux_loss
from parallel.global_router import group_keep_mask
from trainer.train import EXIT_BAD_INPUT, main_from_overrides

NUM_EXPERTS, CAPACITY_FACTOR = 4, 1.0
MICRO = [
    "model.num_layers=2", "model.softmax_period=2", "model.hidden_size=32", "model.num_heads=2",
    "model.head_dim=16", "model.num_kv_heads=2", f"model.num_experts={NUM_EXPERTS}", "model.ffn_hidden_size=64",
    f"model.capacity_factor={CAPACITY_FACTOR}", "model.aux_loss_coef=0.1", "stage.seq_len=64",
    "trainer.micro_batch_size=1", "trainer.steps=3", "trainer.log_every=1000", "logging.wandb.mode=disabled", "logging.plots=false",
    "logging.progress_bar=false", "schedule.lr.warmup_steps=2", "schedule.lr.decay_steps=0",
    "schedule.lr.drop_at_step=null", "schedule.batch=[{tokens:0,global_batch_tokens:128}]",
]
SAVE_AT_2 = ["trainer.checkpoint.every=2", "trainer.checkpoint.keep_last=0"]
KEYS = ("loss", "aux_loss", "grad_norm", "drop_rate", "moe/load_share_min", "moe/load_share_max")
TOLERANCE = {}  # key -> relative tolerance where it is not 1e-5


def job(run_dir: Path, *overrides: str) -> list[str]:
    return [*MICRO, f"trainer.run_dir={run_dir}", *overrides]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def _train_jobs(rank, world_size, jobs):
    return [main_from_overrides(overrides) for overrides in jobs]


def two_rank_rule(mode: str):
    """The EP router's keep mask (`mode` global|local) for two ranks holding the two halves of the tokens."""
    def keep(expert_idx, gates, capacity):
        T = expert_idx.shape[0]
        return group_keep_mask(expert_idx, gates, [T // 2, T // 2], mode, CAPACITY_FACTOR, NUM_EXPERTS)
    return keep


def mean_aux_loss_of_two_halves(self, routing, num_tokens):
    """The local rule's aux loss: each rank's own tokens form its router group; the mean over the two."""
    half = num_tokens // 2
    return sum(switch_aux_loss(routing.probs[s], torch.bincount(routing.expert_idx[s].flatten(), minlength=NUM_EXPERTS),
                               half, self.top_k, self.aux_loss_coef) for s in (slice(0, half), slice(half, None))) / 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 cores are shared with the spawned ranks and other tests
    try:
        assert main_from_overrides(job(root / "single", *SAVE_AT_2)) == 0
        # one micro-batch of both windows = what the two ranks of the router group hold
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model.moe, "capacity_keep_mask", two_rank_rule("global"))
            assert main_from_overrides(job(root / "global_rule", "trainer.micro_batch_size=2")) == 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model.moe, "capacity_keep_mask", two_rank_rule("local"))
            mp.setattr(model.moe.MoE, "aux_loss", mean_aux_loss_of_two_halves)
            assert main_from_overrides(job(root / "local_rule", "trainer.micro_batch_size=2")) == 0

        rcs = run_distributed(_train_jobs, 2, [
            job(root / "tp2", "parallel=tp2", *SAVE_AT_2),
            job(root / "dp2", "parallel=dp"),
            job(root / "tp2_to_dp2", "parallel=dp", f"trainer.resume={step_dir(root / 'tp2', 2)}"),
            job(root / "single_to_tp2", "parallel=tp2", f"trainer.resume={step_dir(root / 'single', 2)}"),
            job(root / "bad_layout", "parallel=ep2", "model.num_experts=3"),
        ])
        assert rcs[0] == [0, 0, 0, 0, EXIT_BAD_INPUT], rcs
        rcs = run_distributed(_train_jobs, 2, [
            job(root / "cp2", "parallel=cp2"),
            job(root / "ep2_local", "parallel=ep2", "parallel.router_mode=local"),
            job(root / "ep2_global", "parallel=ep2"),
            job(root / "tp2_ep2_global", "parallel=tp2", "parallel.ep=2", "trainer.micro_batch_size=2"),
            job(root / "tp2_ep2_local", "parallel=tp2", "parallel.ep=2", "parallel.router_mode=local",
                "trainer.micro_batch_size=2"),
        ])
        assert rcs[0] == [0, 0, 0, 0, 0], rcs
        assert main_from_overrides(job(root / "tp2_to_single", f"trainer.resume={step_dir(root / 'tp2', 2)}")) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def assert_same_steps(reference: list[dict], got: list[dict], label: str, keys=KEYS) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in reference[-len(got):]], label
    for a, b in zip(reference[-len(got):], got):
        for key in keys:
            rel = TOLERANCE.get(key, 1e-5)
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-12), (label, a["step"], key, a[key], b[key])


@pytest.mark.parametrize("layout", ["tp2", "dp2", "cp2", "ep2_local"])
def test_layout_matches_single_process(runs, layout):
    single = metrics(runs / "single")
    assert len(single) == 3 and all(r["drop_rate"] > 0 for r in single)  # tokens really drop
    assert_same_steps(single, metrics(runs / layout), layout)


@pytest.mark.parametrize("layout, rule", [("ep2_global", "global_rule"), ("tp2_ep2_global", "global_rule"),
                                          ("tp2_ep2_local", "local_rule")])
def test_expert_parallel_matches_single_process_with_the_same_rule(runs, layout, rule):
    reference = metrics(runs / rule)
    assert all(r["drop_rate"] > 0 and r["aux_loss"] > 0 for r in reference)
    assert_same_steps(reference, metrics(runs / layout), layout)


@pytest.mark.parametrize("resumed, uninterrupted", [("tp2_to_dp2", "tp2"), ("tp2_to_single", "tp2"),
                                                    ("single_to_tp2", "single")])
def test_resume_under_another_layout(runs, resumed, uninterrupted):
    got = metrics(runs / resumed)
    assert [r["step"] for r in got] == [3]
    assert_same_steps(metrics(runs / uninterrupted), got, resumed, keys=("loss", "grad_norm"))
    assert_same_steps(metrics(runs / "single"), got, resumed, keys=("loss",))
    assert (step_dir(runs / resumed, 3) / "complete").is_file()


def test_bad_layout_fails_before_writing(runs):
    assert not (runs / "bad_layout").exists()
