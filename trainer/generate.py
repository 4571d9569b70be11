"""`python -m trainer.generate <checkpoint> prompt="..." [max_new_tokens=64] [temperature=0] [top_p=1]
[seed=0] [device=cpu|cuda]`: continue a prompt with a trained checkpoint and print the completion.

<checkpoint>: a checkpoint folder of `trainer.train` (`<run_dir>/checkpoints/step_N`), written under any
parallel layout, or a run dir / checkpoints folder (its newest complete checkpoint). The model is built in one
process from the run's config.yaml with the fp32 master weights and the prompt is encoded with the run's
tokenizer. temperature=0 (default) decodes greedily; otherwise tokens are sampled from
softmax(logits / temperature) restricted to the nucleus of probability top_p, reproducibly for a seed.
Generation stops after max_new_tokens or at the tokenizer's end-of-text token (not printed). Decoding is
incremental (`model.generate`): lightning layers carry their recurrent state, softmax layers a KV cache, and
MoE layers drop no token. device: cuda when available by default. Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from .config import ConfigError, command_line, key_value_args
from .export import read_run, resolve_checkpoint

DEFAULTS = {"prompt": None, "max_new_tokens": "64", "temperature": "0", "top_p": "1", "seed": "0", "device": None}


def _number(options: dict, key: str, kind, ok, expected: str):
    try:
        value = kind(options[key])
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise ConfigError(f"{key}={options[key]}: expected {expected}")
    return value


def parse_args(argv: list[str]) -> dict:
    options = dict(DEFAULTS)
    positional = key_value_args(argv, options)
    if len(positional) != 1:
        raise ConfigError(f"expected one checkpoint folder, got {len(positional)}: {' '.join(positional)}")
    if not options["prompt"]:
        raise ConfigError('prompt="..." is required and must not be empty')
    device = options["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device={device} must be cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    return {
        "checkpoint": Path(positional[0]),
        "prompt": options["prompt"],
        "max_new_tokens": _number(options, "max_new_tokens", int, lambda n: n > 0, "a positive integer"),
        "temperature": _number(options, "temperature", float, lambda t: math.isfinite(t) and t >= 0,
                               "a number >= 0 (0: greedy)"),
        "top_p": _number(options, "top_p", float, lambda p: 0 < p <= 1, "a number in (0, 1]"),
        "seed": _number(options, "seed", int, lambda s: s >= 0, "a non-negative integer"),
        "device": torch.device(device),
    }


def load_model(checkpoint: Path, device: torch.device):
    """The checkpoint's model on `device` in eval mode (read one parameter at a time) and the run's tokenizer."""
    from model import MiniMaxForCausalLM

    cfg, tokenizer, reader = read_run(checkpoint)
    with torch.device("meta"):  # no initialisation: every parameter is overwritten
        model = MiniMaxForCausalLM(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied weight once
            p.copy_(reader.read(name))
    return model.eval(), tokenizer


def complete(checkpoint: Path, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
             device: torch.device) -> str:
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's load errors are BaseExceptions

    from model.generate import generate

    checkpoint = resolve_checkpoint(checkpoint)
    try:
        model, tokenizer = load_model(checkpoint, device)
    except (ValueError, OSError, CheckpointException) as exc:  # ConfigError included
        raise ConfigError(f"{checkpoint}: {str(exc).strip().splitlines()[0]}") from None
    ids = torch.tensor(tokenizer.encode(prompt), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    new = generate(model, ids, max_new_tokens, temperature, top_p, generator, eos_id=tokenizer.eos_id).tolist()
    if new and new[-1] == tokenizer.eos_id:
        new.pop()
    return tokenizer.decode(new)


def main(argv: list[str] | None = None) -> int:
    def run(args):
        print(complete(**parse_args(args)))
        return 0

    return command_line(__doc__, argv, run)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
