"""Incremental decoding (`model.generate`): per-token logits equal full forwards on a hybrid config (lightning
and softmax layers, GQA, half rotary, MoE without capacity drop), greedy and nucleus sampling; and
`python -m trainer.generate` on a checkpoint of a tiny `trainer.train` run, with one-line errors for bad input."""

import dataclasses

import pytest
import torch

from model import MiniMaxForCausalLM, ModelConfig
from model.generate import decode_step, generate, next_token, nucleus_probs, prefill
from trainer.generate import main

CFG = ModelConfig(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, head_dim=8, num_kv_heads=2,
                  layer_types=["lightning", "softmax", "lightning"], num_experts=4, top_k=2, ffn_hidden_size=32,
                  capacity_factor=None, lightning_block_size=8)  # blocks of 8: the prompts span several
TRAIN = [
    "model.num_layers=2", "model.softmax_period=2", "model.hidden_size=32", "model.num_heads=2",
    "model.head_dim=16", "model.num_kv_heads=1", "model.num_experts=4", "model.ffn_hidden_size=64",
    "stage.seq_len=64", "trainer.micro_batch_size=2", "trainer.steps=2", "trainer.log_every=1000",
    "trainer.device=cpu", "logging.wandb.mode=disabled", "logging.progress_bar=false",
    "schedule.lr.warmup_steps=0", "schedule.lr.decay_steps=0", "schedule.lr.drop_at_step=null",
    "schedule.batch=[{tokens:0,global_batch_tokens:128}]",
]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def model():
    assert CFG.rotary_dim == CFG.head_dim // 2 and CFG.num_kv_heads < CFG.num_heads
    return MiniMaxForCausalLM(CFG, seed=3).eval()


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.tensor([0, ids.shape[0]], dtype=torch.int32)).logits


def assert_close(got, want, scale):
    assert (got - want).abs().max().item() <= 1e-4 * scale


def in_nucleus(logits, temperature, top_p) -> set:
    """The fewest most likely tokens whose probability reaches top_p, computed token by token."""
    probs = torch.softmax(logits.double() / temperature, -1)
    kept, mass = set(), 0.0
    for i in probs.argsort(descending=True).tolist():
        kept.add(i)
        mass += probs[i].item()
        if mass >= top_p:
            return kept
    return kept


def test_incremental_logits_equal_full_forward(model, gen):
    ids = torch.randint(0, CFG.vocab_size, (29,), generator=gen)
    full = full_logits(model, ids)
    scale = full.abs().max().item()
    assert full.std() > 0.1
    logits, cache = prefill(model, ids[:11])
    assert_close(logits, full[:11], scale)
    for t in range(11, 29):
        logits, cache = decode_step(model, ids[t], cache)
        assert_close(logits, full[t], scale)
    assert cache.position == 29
    assert cache.layers["0"].shape == (CFG.num_heads, CFG.head_dim, CFG.head_dim)  # O(1) in the length
    keys, values = cache.layers["1"]
    assert keys.shape == values.shape == (29, CFG.num_kv_heads, CFG.head_dim)


def test_decoding_drops_no_token_whatever_the_capacity_factor(model, gen):
    tight = MiniMaxForCausalLM(dataclasses.replace(CFG, capacity_factor=0.5)).eval()
    tight.load_state_dict(model.state_dict())
    ids = torch.randint(0, CFG.vocab_size, (11,), generator=gen)
    with torch.no_grad():
        assert tight(ids, torch.tensor([0, 11], dtype=torch.int32)).moe_dropped > 0  # training would drop
    full = full_logits(model, ids)
    assert_close(prefill(tight, ids)[0], full, full.abs().max().item())


def test_greedy_is_argmax_of_full_forwards(model, gen):
    ids = torch.randint(0, CFG.vocab_size, (9,), generator=gen)
    new = generate(model, ids, 12)
    seq = ids
    for _ in range(12):
        seq = torch.cat([seq, full_logits(model, seq)[-1].argmax(-1, keepdim=True)])
    assert new.tolist() == seq[9:].tolist()
    stop = new[4].item()
    assert generate(model, ids, 12, eos_id=stop).tolist() == new[:new.tolist().index(stop) + 1].tolist()


def test_tiny_top_p_is_greedy_and_samples_stay_in_the_nucleus(model, gen):
    ids = torch.randint(0, CFG.vocab_size, (9,), generator=gen)
    assert generate(model, ids, 10, temperature=0.7, top_p=1e-6, generator=gen).tolist() == \
        generate(model, ids, 10).tolist()
    new = generate(model, ids, 12, temperature=1.5, top_p=0.6, generator=gen)
    logits = full_logits(model, torch.cat([ids, new]))
    for step, token in enumerate(new.tolist()):
        assert token in in_nucleus(logits[8 + step], 1.5, 0.6)


def test_nucleus_boundaries():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for top_p, kept in ((0.4, {0}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        probs = nucleus_probs(logits, 1.0, top_p)
        assert set(probs.nonzero().flatten().tolist()) == kept == in_nucleus(logits, 1.0, top_p)
        assert abs(probs.sum().item() - 1) < 1e-6
    g = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, 1.0, 0.8, g).item() for _ in range(200)}
    assert drawn == {0, 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from trainer.train import main_from_overrides

    run = tmp_path_factory.mktemp("generate") / "run"
    assert main_from_overrides([*TRAIN, f"trainer.run_dir={run}"]) == 0
    return run


def test_cli_prints_the_greedy_completion(run_dir, capsys):
    from omegaconf import OmegaConf

    from data import build_tokenizer
    from parallel.checkpoint import load_checkpoint
    from trainer.train import build_model_config

    prompt = "Once upon a time"
    assert main([str(run_dir), f"prompt={prompt}", "max_new_tokens=8", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    step_dir = run_dir / "checkpoints" / "step_000002"  # loaded independently of the CLI
    run_cfg = OmegaConf.load(step_dir / "config.yaml")
    cfg = build_model_config(run_cfg)
    cfg.capacity_factor = None
    reference = MiniMaxForCausalLM(cfg)
    load_checkpoint(step_dir, reference)
    tokenizer = build_tokenizer(run_cfg.data.tokenizer)
    new = generate(reference, torch.tensor(tokenizer.encode(prompt)), 8, eos_id=tokenizer.eos_id).tolist()
    assert printed == tokenizer.decode([t for t in new if t != tokenizer.eos_id]) + "\n"

    sampled = [str(step_dir), f"prompt={prompt}", "max_new_tokens=8", "temperature=1.2", "top_p=0.9", "seed=7"]
    outputs = []
    for _ in range(2):
        assert main(sampled) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # the seed makes sampling reproducible


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "unknown_option", "no_prompt", "temperature",
                                  "top_p", "max_new_tokens", "device"])
def test_bad_input_is_one_line_with_exit_code_2(case, run_dir, tmp_path, capsys):
    args = {
        "missing": [str(tmp_path / "nope"), "prompt=hi"],
        "not_a_checkpoint": [str(tmp_path), "prompt=hi"],
        "unknown_option": [str(run_dir), "prompt=hi", "beams=4"],
        "no_prompt": [str(run_dir)],
        "temperature": [str(run_dir), "prompt=hi", "temperature=-1"],
        "top_p": [str(run_dir), "prompt=hi", "top_p=0"],
        "max_new_tokens": [str(run_dir), "prompt=hi", "max_new_tokens=ten"],
        "device": [str(run_dir), "prompt=hi", "device=tpu"],
    }[case]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""
