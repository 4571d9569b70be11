"""`trainer.init_from`: a fresh run starts from an earlier run's checkpoint (weights and optimizer state, any
layout) or from Hugging Face weights (each rank reads its slices). A checkpoint exported to HF and imported under
CP=2 x EP=2 trains its first step with the same loss as one process importing it, and as one process starting
from the checkpoint itself; bad sources are one line, exit code 2, nothing written."""

import pytest
from dist_harness import run_distributed
from test_trainer_parallel import job, metrics, step_dir

from trainer.train import EXIT_BAD_INPUT, main_from_overrides

pytest.importorskip("transformers")
# no token drop: the expert-parallel global router then routes exactly as one process
NO_DROP = ["model.capacity_factor=null", "trainer.steps=1", "schedule.lr.warmup_steps=0"]


def _train(rank, world, overrides):
    return main_from_overrides(overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from trainer.export import main as export

    root = tmp_path_factory.mktemp("init_from")
    assert main_from_overrides(job(root / "source", *NO_DROP, "trainer.steps=2")) == 0
    assert export([str(step_dir(root / "source", 2)), f"out={root / 'hf'}"]) == 0
    hf = f"trainer.init_from=hf:{root / 'hf'}"
    assert main_from_overrides(job(root / "hf_single", *NO_DROP, hf)) == 0
    assert main_from_overrides(job(root / "ckpt_single", *NO_DROP,
                                   f"trainer.init_from={step_dir(root / 'source', 2)}")) == 0
    rcs = run_distributed(_train, 4, job(root / "hf_cp2_ep2", *NO_DROP, hf, "parallel.cp=2", "parallel.ep=2"))
    assert rcs == [0] * 4, rcs
    return root


def test_hf_import_under_cp2_ep2_trains_like_one_process(runs):
    single, parallel = metrics(runs / "hf_single"), metrics(runs / "hf_cp2_ep2")
    assert [r["step"] for r in parallel] == [1]
    assert parallel[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    assert parallel[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-4)


def test_checkpoint_and_its_hf_export_start_the_same_run(runs):
    from_hf, from_ckpt, source = (metrics(runs / n) for n in ("hf_single", "ckpt_single", "source"))
    assert from_ckpt[0]["loss"] == pytest.approx(from_hf[0]["loss"], rel=1e-5)
    # the counters start anew: step 1 again, on the first global batch, with trained weights (a lower loss)
    assert from_ckpt[0]["step"] == 1 and from_ckpt[0]["loss"] < source[0]["loss"]


def test_bad_init_sources_fail_before_writing(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    cases = {f"hf:{tmp_path / 'empty'}": "no Hugging Face model there",
             str(tmp_path / "empty"): "not a complete checkpoint"}
    for source, message in cases.items():
        run_dir = tmp_path / "run"
        assert main_from_overrides(job(run_dir, *NO_DROP, f"trainer.init_from={source}")) == EXIT_BAD_INPUT
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not run_dir.exists()
