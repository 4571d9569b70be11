"""`python -m trainer.export`: a checkpoint written under TP=2 x EP=2 (2 gloo ranks; half rotary, a softmax
layer) becomes an HF folder that transformers loads with our model's logits (from the same checkpoint, one
process), in several shards with an index, with the run's tokenizer; bad input is one line, exit code 2,
nothing written."""

import json

import pytest
import torch
from dist_harness import run_distributed

from data import build_tokenizer
from trainer.config import EXIT_BAD_INPUT
from trainer.export import main

transformers = pytest.importorskip("transformers")

MICRO = [
    "model.num_layers=2", "model.softmax_period=2", "model.hidden_size=32", "model.num_heads=2",
    "model.head_dim=16", "model.num_kv_heads=2", "model.num_experts=4", "model.ffn_hidden_size=64",
    "stage.seq_len=64", "trainer.micro_batch_size=2", "trainer.steps=1", "trainer.log_every=1000",
    "logging.wandb.mode=disabled", "logging.plots=false", "logging.progress_bar=false", "schedule.lr.warmup_steps=0",
    "schedule.lr.decay_steps=0", "schedule.lr.drop_at_step=null", "optim.lr=0.01",
    "schedule.batch=[{tokens:0,global_batch_tokens:128}]", "parallel=tp2", "parallel.ep=2",
]


def _train(rank, world, overrides):
    from trainer.train import main_from_overrides

    return main_from_overrides(overrides)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_cpu_thread):
    run = tmp_path_factory.mktemp("export") / "run"
    assert run_distributed(_train, 2, [*MICRO, f"trainer.run_dir={run}"]) == [0, 0]
    return run


def our_model(step_dir):
    """Our model from the checkpoint in one process, as inference runs it (no token drop: HF has none)."""
    from omegaconf import OmegaConf

    from model import MiniMaxForCausalLM
    from parallel.checkpoint import load_checkpoint
    from trainer.train import build_model_config

    cfg = build_model_config(OmegaConf.load(step_dir / "config.yaml"))
    cfg.capacity_factor = None
    model = MiniMaxForCausalLM(cfg)
    load_checkpoint(step_dir, model)
    return model.eval()


def logits_both(step_dir, out, dtype=torch.float32):
    ours = our_model(step_dir)
    hf = transformers.MiniMaxForCausalLM.from_pretrained(out, dtype=dtype).eval()
    hf.config._attn_implementation = "eager"
    ids = torch.randint(0, ours.cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = ours(ids, torch.tensor([0, 50], dtype=torch.int32)).logits
        return ours_logits, hf(input_ids=ids[None]).logits[0].float()


def test_export_loads_in_transformers_with_our_logits(run_dir, tmp_path):
    step_dir = run_dir / "checkpoints" / "step_000001"
    out = tmp_path / "hf"
    assert main([str(step_dir), f"out={out}", "max_shard_size=100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp folder left
    config = json.loads((out / "config.json").read_text())
    half_rotary = {"rope_type": "proportional", "rope_theta": 1e4 ** 2, "partial_rotary_factor": 0.5}
    assert config["rope_parameters"] == half_rotary
    ours, hf = logits_both(step_dir, out)
    assert ours.std() > 0.1
    assert (ours - hf).abs().max().item() <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    default = build_tokenizer("default")
    assert tokenizer.eos_token_id == default.eos_id == config["eos_token_id"]
    assert tokenizer("hello world")["input_ids"] == default.encode("hello world")


def test_bf16_export_of_a_run_dirs_newest_checkpoint(run_dir, tmp_path):
    out = tmp_path / "hf16"
    assert main([str(run_dir), f"out={out}", "dtype=bf16"]) == 0
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == {"model-00001-of-00001.safetensors"}  # 5GB: one shard
    ours, hf = logits_both(run_dir / "checkpoints" / "step_000001", out, torch.bfloat16)
    assert (ours - hf).abs().max().item() <= 0.1 * ours.abs().max().item()


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "out_not_empty", "unknown_option", "no_out",
                                  "bad_dtype"])
def test_bad_input_is_one_line_and_writes_nothing(case, run_dir, tmp_path, capsys):
    step_dir, out = run_dir / "checkpoints" / "step_000001", tmp_path / "out"
    args = {
        "missing": [str(tmp_path / "nope"), f"out={out}"],
        "not_a_checkpoint": [str(tmp_path), f"out={out}"],
        "out_not_empty": [str(step_dir), f"out={run_dir}"],
        "unknown_option": [str(step_dir), f"out={out}", "shards=3"],
        "no_out": [str(step_dir)],
        "bad_dtype": [str(step_dir), f"out={out}", "dtype=fp8"],
    }[case]
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*")) and not list(run_dir.parent.glob(".tmp-*"))
    assert sorted(p.name for p in run_dir.iterdir()) == before
