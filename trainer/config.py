"""Composing the Hydra config and checking the trainer's settings, each failure as one line naming the setting."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data.errors import ConfigError  # the one error type for bad input, data settings included

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_NAME = "config"
EXIT_BAD_INPUT = 2  # invalid input: one line naming the setting, nothing written


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def key_value_args(argv: list[str], options: dict) -> list[str]:
    """A tool's `key=value` arguments into `options` (its known keys, with defaults); returns the others."""
    for arg in (a for a in argv if "=" in a):
        key, _, value = arg.partition("=")
        if key not in options:
            raise ConfigError(f"unknown option {key}= (expected {', '.join(o + '=' for o in options)})")
        options[key] = value
    return [a for a in argv if "=" not in a]


def command_line(doc: str, argv: list[str] | None, run) -> int:
    """A tool's entry point: `--help` prints `doc`; bad input is one `error:` line and EXIT_BAD_INPUT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(doc.strip())
        return 0
    try:
        return run(argv)
    except ConfigError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def _hydra_message(exc: Exception) -> str:
    """Hydra's composition errors span several lines and name the key differently per case; make one line."""
    msg = str(exc)
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        return f"config: unknown key '{m.group(1)}' (not in conf/; use +{m.group(1)}=... only to add a new key)"
    m = re.search(r"Could not (?:find|load) '([^']+)'", msg)
    if m:
        group, _, choice = m.group(1).rpartition("/")
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if group else []
        known = f" (available: {', '.join(options)})" if options else ""
        return f"config: {group or 'config'}={choice} is not a known option{known}"
    m = re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        return f"config: unknown key '{m.group(1)}'"
    return "config: " + _one_line(first)


def compose_config(overrides: list[str]) -> DictConfig:
    """The resolved config for `overrides` (Hydra's command-line syntax), in struct mode.

    Hydra's compose API is used instead of @hydra.main so that every error can be reported as one
    line and so tests can run the trainer in-process; Hydra never creates output folders or changes cwd.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_hydra_message(exc)) from None
    finally:
        GlobalHydra.instance().clear()

    model_choice = cfg.hydra.runtime.choices.get("model") or "run"
    with _open_dict(cfg):
        del cfg["hydra"]
        if cfg.trainer.name is None:
            cfg.trainer.name = model_choice
        if cfg.trainer.run_dir is None:
            cfg.trainer.run_dir = os.path.join("outputs", str(cfg.trainer.name))
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError("config: " + _one_line(exc)) from None
    OmegaConf.set_struct(cfg, True)
    return cfg


class _open_dict:
    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, True)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _positive_int(cfg, key: str, allow_zero: bool = False) -> int:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    _need(ok, f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} integer")
    return value


def _number(cfg, key: str, low: float | None = None, nullable: bool = False) -> float | None:
    value = OmegaConf.select(cfg, key)
    if value is None and nullable:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _need(ok and (low is None or value >= low), f"{key}={value!r} must be a number" + (f" >= {low}" if low is not None else ""))
    return float(value)


def _choice(cfg, key: str, options: tuple[str, ...]) -> str:
    value = OmegaConf.select(cfg, key)
    _need(value in options, f"{key}={value!r} must be one of {'|'.join(options)}")
    return value


def validate_trainer_config(cfg: DictConfig) -> None:
    """Type and range checks of the trainer-owned groups (model/ and data/ validate themselves)."""
    for key in ("trainer.steps", "trainer.micro_batch_size", "trainer.log_every", "stage.seq_len"):
        _positive_int(cfg, key)
    for key in ("trainer.seed", "trainer.checkpoint.every", "trainer.checkpoint.keep_last"):
        _positive_int(cfg, key, allow_zero=True)
    for key in ("trainer.checkpoint.at_end", "trainer.checkpoint.async", "trainer.checkpoint.verify", "logging.plots"):
        value = OmegaConf.select(cfg, key)
        _need(isinstance(value, bool), f"{key}={value!r} must be true or false")
    _choice(cfg, "trainer.device", ("auto", "cpu", "cuda"))
    _choice(cfg, "trainer.dtype", ("auto", "fp32", "bf16"))
    _choice(cfg, "trainer.on_nonfinite", ("stop", "skip"))
    steps = cfg.trainer.profile.steps
    _need(steps is None or (len(steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
                            and 1 <= steps[0] <= steps[1]),
          f"trainer.profile.steps={steps} must be null or [first, last] with 1 <= first <= last")
    resume = cfg.trainer.resume
    _need(isinstance(resume, str) and resume != "",
          f"trainer.resume={resume!r} must be none, auto, require or a checkpoint path")
    _need(isinstance(cfg.trainer.run_dir, str) and cfg.trainer.run_dir != "", "trainer.run_dir must be a path")
    init_from = cfg.trainer.get("init_from")
    _need(init_from is None or (isinstance(init_from, str) and init_from not in ("", "hf:")),
          f"trainer.init_from={init_from!r} must be null, a checkpoint path or hf:<directory>")
    _number(cfg, "stage.rope_base", low=1.0, nullable=True)
    _number(cfg, "trainer.step_timeout_s", low=0.0)
    _check_stage_mixture(cfg)
    _check_eval_settings(cfg)

    _choice(cfg, "optim.name", ("adamw",))
    _choice(cfg, "optim.impl", ("auto", "fused", "foreach"))
    _number(cfg, "optim.lr", low=0.0)
    _number(cfg, "optim.eps", low=0.0)
    _number(cfg, "optim.weight_decay", low=0.0)
    _number(cfg, "optim.grad_clip", low=0.0, nullable=True)
    betas = cfg.optim.betas
    _need(len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
          f"optim.betas={list(betas)} must be two numbers in [0, 1)")

    _choice(cfg, "logging.wandb.mode", ("online", "offline", "disabled"))
    _number(cfg, "logging.peak_tflops", low=0.0, nullable=True)
    _number(cfg, "logging.cpu_peak_tflops", low=0.0)
    _need(cfg.parallel.get("name") is not None, "parallel.name must be set (e.g. parallel=single)")


def _check_stage_mixture(cfg: DictConfig) -> None:
    tokens = cfg.stage.get("transition_tokens") or 0
    _need(isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0,
          f"stage.transition_tokens={tokens!r} must be a non-negative integer")
    previous = cfg.stage.get("previous_mixture")
    _need(previous is None or (isinstance(previous, DictConfig) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in previous.values())),
        f"stage.previous_mixture={previous!r} must map the mixture's sources to weights, e.g. {{short: 0.3, medium: 0.7}}")


EVAL_SOURCES = ("default", "files", "hub", "indexed")


def _check_eval_settings(cfg: DictConfig) -> None:
    every = _positive_int(cfg, "eval.every", allow_zero=True)
    _positive_int(cfg, "eval.windows")
    holdout = _number(cfg, "eval.data.holdout", low=0.0)
    _need(holdout < 1, f"eval.data.holdout={holdout} must be a fraction in [0, 1)")
    source = cfg.eval.data.source
    _need(source is None or source in EVAL_SOURCES,
          f"eval.data.source={source!r} must be null (data.*'s held-out documents) or one of {'|'.join(EVAL_SOURCES)}")
    _need(not every or holdout > 0 or source is not None,
          f"eval.every={every} needs validation data: eval.data.holdout=<fraction of data.*'s documents held out of "
          f"training> or eval.data.source/path")


def check_eval(cfg: DictConfig, dp: int, pipeline: bool) -> None:
    """Validation fits the layout: each DP rank evaluates eval.windows / dp windows in whole micro-batches."""
    if not cfg.eval.every:
        return
    _need(not pipeline, "eval.every: validation under pipeline parallelism (parallel.pp > 1) is not supported; "
                        "set eval.every=0")
    windows, mbs = int(cfg.eval.windows), int(cfg.trainer.micro_batch_size)
    _need(windows % (mbs * dp) == 0, f"eval.windows={windows} is not divisible by trainer.micro_batch_size={mbs} x "
                                     f"data-parallel size={dp} (= {mbs * dp})")
