"""Pipeline parallelism through the trainer (gloo, fp32 CPU, micro model of 4 layers): every PP layout trains
like one process, per step (loss, aux loss, drop rate, expert load, grad norm) and in the parameters after the
last step, across a step where the global batch doubles (so the schedule's micro-batch count changes);
checkpoints reshard into and out of PP layouts; bad pipeline settings stop before anything is written."""

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_harness import run_distributed
from test_trainer_parallel import assert_same_steps, job, metrics, step_dir

from parallel.pipeline import balanced_split, plan_pipeline
from trainer.train import EXIT_BAD_INPUT, main_from_overrides

# 4 layers (lightning, softmax, lightning, softmax); 4 windows per step, then 8 from step 3 on
PP = ["model.num_layers=4", "schedule.batch=[{tokens:0,global_batch_tokens:256},{tokens:512,global_batch_tokens:512}]",
      "trainer.checkpoint.every=2", "trainer.checkpoint.keep_last=0"]
TWO_RANKS = {
    "pp2_recompute": ["parallel.pp=2", "trainer.recompute=true"],
    "pp2_interleaved": ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
}
FOUR_RANKS = {
    "pp4": ["parallel.pp=4"],
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2_ep2": ["parallel.pp=2", "parallel.ep=2", "parallel.router_mode=local"],
    "pp2_cp2": ["parallel.pp=2", "parallel.cp=2"],
}
BAD = {
    "schedule": (["parallel.pp=2", "parallel.pp_schedule=zbv"], "parallel.pp_schedule='zbv' must be one of"),
    "split": (["parallel.pp=2", "parallel.pp_layers=[1,2]"], "parallel.pp_layers=[1, 2] must list 2 positive"),
    "stages": (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=4"],
               "model.num_layers=4 does not split into parallel.pp x parallel.virtual_stages = 2 x 4"),
    "micro_batches": (["parallel.pp=2", "schedule.batch=[{tokens:0,global_batch_tokens:64}]"],
                      "parallel.pp_schedule=1f1b needs at least parallel.pp=2 micro-batches per rank"),
}


def pp_job(run_dir, *overrides):
    return job(run_dir, *PP, *overrides)


def _train_jobs(rank, world_size, jobs):
    return [main_from_overrides(overrides) for overrides in jobs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_cpu_thread):
    root = tmp_path_factory.mktemp("pipeline")
    assert main_from_overrides(pp_job(root / "single")) == 0
    rcs = run_distributed(_train_jobs, 2, [pp_job(root / name, *o) for name, o in TWO_RANKS.items()] + [
        pp_job(root / "single_to_pp2", "parallel.pp=2", f"trainer.resume={step_dir(root / 'single', 2)}"),
        *(pp_job(root / f"bad_{name}", *o) for name, (o, _) in BAD.items())])
    assert rcs[0] == [0] * (len(TWO_RANKS) + 1) + [EXIT_BAD_INPUT] * len(BAD), rcs
    rcs = run_distributed(_train_jobs, 4, [pp_job(root / name, *o) for name, o in FOUR_RANKS.items()])
    assert rcs[0] == [0] * len(FOUR_RANKS), rcs
    assert main_from_overrides(pp_job(root / "pp2_tp2_to_single",
                                      f"trainer.resume={step_dir(root / 'pp2_tp2', 2)}")) == 0
    return root


def final_parameters(run_dir) -> dict:
    """The fp32 master weights of the last checkpoint, whole (one process reads every rank's shards)."""
    path = str(step_dir(run_dir, 3))
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size) for k, m in meta.items() if k.startswith("model/")}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


@pytest.mark.parametrize("layout", [*TWO_RANKS, *FOUR_RANKS])
def test_pipeline_layout_matches_single_process(runs, layout):
    single = metrics(runs / "single")
    assert [r["global_batch_tokens"] for r in single] == [256, 256, 512]
    assert all(r["drop_rate"] > 0 and r["aux_loss"] > 0 for r in single)
    assert_same_steps(single, metrics(runs / layout), layout)
    reference, got = final_parameters(runs / "single"), final_parameters(runs / layout)
    assert got.keys() == reference.keys()
    for name, want in reference.items():
        err = float((got[name] - want).norm() / want.norm())
        assert err < 1e-5, (layout, name, err)


@pytest.mark.parametrize("resumed", ["single_to_pp2", "pp2_tp2_to_single"])
def test_resume_into_and_out_of_a_pipeline_layout(runs, resumed):
    got = metrics(runs / resumed)
    assert [r["step"] for r in got] == [3]
    assert_same_steps(metrics(runs / "single"), got, resumed)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_pipeline_settings_stop_before_writing(runs, name):
    assert not (runs / f"bad_{name}").exists()


def test_bad_pipeline_settings_name_the_setting():
    from model.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, head_dim=16, num_kv_heads=2,
                      num_experts=4, ffn_hidden_size=64, softmax_period=2)
    calls = {"schedule": lambda: plan_pipeline(cfg, 2, "zbv"),
             "split": lambda: plan_pipeline(cfg, 2, pp_layers=[1, 2]),
             "stages": lambda: plan_pipeline(cfg, 2, "interleaved_1f1b", 4),
             "micro_batches": lambda: plan_pipeline(cfg, 2).check_micro_batches(1)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match="^" + re.escape(BAD[name][1])):
            call()


def test_cost_model_balances_the_stages():
    # a softmax layer at a long window costs what three lightning layers do; the head adds to the last stage
    assert balanced_split([1, 1, 1, 3, 1, 1], 2, 0) == [3, 3]  # stage costs 3 | 5 (4 | 2 would cost 6 | 2)
    sizes = balanced_split([1] * 8, 4, 1.5)
    assert sum(sizes) == 8 and max(sizes[:-1] + [sizes[-1] + 1.5]) == 3
