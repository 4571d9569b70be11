"""`python -m trainer.train [hydra overrides]`: train a MiniMax-01-style model (one process or under torchrun).

All inputs are checked before any work or file write; a bad one is reported as one line naming the setting,
with exit code 2. A non-finite loss stops the run before the optimizer step with exit code 3.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt
from .config import EXIT_BAD_INPUT, ConfigError, check_eval, compose_config, validate_trainer_config
from .distributed import DistEnv, env_from_torchrun, init_process_group, pick_device, shutdown
from .layout import Layout, LayoutSpec, check_batches, check_layout
from .logger import say
from .schedules import BatchSchedule, LRSchedule

EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 4  # a stop signal: the current step finished and was checkpointed
EXIT_INTERRUPTED = 130  # a second Ctrl-C


@dataclass
class Plan:
    """Everything decided and checked before the first side effect."""

    model_cfg: object
    layout: LayoutSpec
    tokenizer: object
    stream: object
    collate: object
    lr_schedule: LRSchedule
    batch_schedule: BatchSchedule
    device: torch.device
    autocast_dtype: torch.dtype | None
    run_dir: Path
    resume_from: Path | None
    init_from: tuple[str, Path] | None  # ("checkpoint" | "hf", path) for a fresh run
    resume_fallbacks: list[Path]  # resume=auto|require: older checkpoints, newest first, if resume_from is damaged
    mixture: object = None  # data.MixtureTransition: each step's mixture weights (when the data is a mixture)
    eval_source: object = None  # data.DataSource of the validation windows (when eval.every > 0)


def build_model_config(cfg):
    from model import ModelConfig

    model_dict = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.stage.get("rope_base") is not None:  # the RoPE base belongs to the context stage (MiniMax Table 6)
        model_dict["rope_base"] = float(cfg.stage.rope_base)
    try:
        return ModelConfig.from_dict(model_dict)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("model config") else f"model config: {msg}") from None


def _data_error(exc: Exception) -> ConfigError:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return ConfigError(msg if msg.startswith(("data", "eval.data")) else f"data: {msg}")


def plan_run(cfg, env: DistEnv) -> Plan:
    """Check every input and build the objects that only read (config, tokenizer, data stream)."""
    validate_trainer_config(cfg)
    model_cfg = build_model_config(cfg)
    seq_len, mbs = int(cfg.stage.seq_len), int(cfg.trainer.micro_batch_size)
    layout = check_layout(cfg.parallel, env.world_size, model_cfg, seq_len)

    lr_schedule = LRSchedule.from_config(cfg.optim.lr, cfg.trainer.steps, cfg.schedule.lr)
    batch_schedule = BatchSchedule.from_config(cfg.schedule.batch)
    check_batches(batch_schedule, layout, mbs, seq_len)
    check_eval(cfg, layout.dp, layout.pipeline is not None)

    device = pick_device(cfg.trainer.device, env)
    dtype = cfg.trainer.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None

    from data import DataSource, Holdout, MixtureTransition, build_tokenizer, check_streams, collate_windows

    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise _data_error(exc) from None
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer})")
    if cfg.stage.get("mixture") is not None:  # a long-context stage draws its windows from its own mixture
        cfg.data.mixture = cfg.stage.mixture
    try:
        # the corpus is split into data.streams sub-streams; each DP rank reads its share (data.substreams)
        check_streams(cfg.data.streams, layout.dp)
        stream = DataSource(cfg.data, tokenizer, seq_len, Holdout(float(cfg.eval.data.holdout)))  # held-out: not read
        eval_source = _eval_source(cfg, tokenizer, seq_len) if cfg.eval.every else None
        stream.stream(0).next_window()  # data that yields nothing fails here, before anything is written
    except (ValueError, OSError, RuntimeError, KeyError, StopIteration) as exc:
        raise _data_error(exc) from None
    previous, transition_tokens = cfg.stage.get("previous_mixture"), cfg.stage.get("transition_tokens") or 0
    if stream.weights is None and (previous is not None or transition_tokens):
        raise ConfigError("stage.previous_mixture / stage.transition_tokens: the data is not a mixture (set "
                          "stage.mixture or data.mixture)")
    if transition_tokens and previous is None:
        raise ConfigError(f"stage.transition_tokens={transition_tokens} needs stage.previous_mixture (the weights "
                          f"the transition starts from)")
    # the weights move from the previous stage's to this one's over the first transition_tokens tokens
    mixture = None if stream.weights is None else MixtureTransition(previous or stream.weights, stream.weights,
                                                                    transition_tokens)

    run_dir = Path(cfg.trainer.run_dir)
    candidates = ckpt.resume_candidates(cfg.trainer.resume, run_dir / "checkpoints")
    if cfg.trainer.resume == "none" and ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
        raise ConfigError(f"trainer.run_dir={run_dir} already holds checkpoints; pass trainer.resume=auto to "
                          f"continue that run, or choose another trainer.name / trainer.run_dir")
    resume_from = candidates[0] if candidates else None
    return Plan(model_cfg, layout, tokenizer, stream, collate_windows, lr_schedule, batch_schedule, device,
                autocast_dtype, run_dir, resume_from, None if resume_from else _init_source(cfg.trainer.init_from),
                candidates[1:], mixture=mixture, eval_source=eval_source)


def _eval_source(cfg, tokenizer, seq_len: int):
    """The validation windows' source, one stream: data.*'s held-out documents (eval.data.holdout), the mixture
    included, or a corpus of its own (eval.data.source, path, name, split; the other data.* settings apply)."""
    from data import DataSource, Holdout

    data_cfg, own = OmegaConf.to_container(cfg.data, resolve=True), cfg.eval.data
    if own.source is None:
        return DataSource({**data_cfg, "streams": 1}, tokenizer, seq_len, Holdout(float(own.holdout), held_out=True))
    return DataSource({**data_cfg, "mixture": None, "streams": 1, "source": own.source, "path": own.path,
                       "name": own.name, "split": own.split or data_cfg.get("split")}, tokenizer, seq_len)


def _init_source(init_from) -> tuple[str, Path] | None:
    """Where a fresh run's weights come from, checked before anything is written."""
    if init_from is None:
        return None
    if init_from.startswith("hf:"):
        path = Path(init_from[3:])
        if not (path / "config.json").is_file():
            raise ConfigError(f"trainer.init_from={init_from}: no Hugging Face model there (no config.json)")
        return "hf", path
    path = Path(init_from)
    if not (path / ckpt.MARKER).is_file():
        raise ConfigError(f"trainer.init_from={init_from}: not a complete checkpoint (no '{ckpt.MARKER}' marker)")
    return "checkpoint", path


def _verify_before_load(env: DistEnv, plan: Plan) -> None:
    """Check the files of the checkpoint to load against its manifest (collective, before anything is written);
    resume=auto|require falls back to the newest older checkpoint that passes, with a warning."""
    while plan.resume_from is not None:
        try:
            _verify("trainer.resume", plan.resume_from, env)
            return
        except ConfigError as exc:  # damaged
            if not plan.resume_fallbacks:
                raise
            if env.is_main:
                say(f"warning: {exc}; resuming from the previous one, {plan.resume_fallbacks[0]}")
            plan.resume_from = plan.resume_fallbacks.pop(0)
    if plan.init_from is not None and plan.init_from[0] == "checkpoint":
        _verify("trainer.init_from", plan.init_from[1], env)


def _verify(key: str, path: Path, env: DistEnv) -> None:
    from parallel.checkpoint import MANIFEST, DamagedCheckpoint, verify_checkpoint

    try:
        verified = verify_checkpoint(path)
    except DamagedCheckpoint as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if not verified and env.is_main:
        say(f"warning: {key}: checkpoint {path} has no {MANIFEST} (saved before checksums were recorded); "
            f"loading it unverified")


def run(cfg, env: DistEnv) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's load errors are BaseExceptions

    from model import MiniMaxForCausalLM

    from .logger import RunLogger
    from .loop import Trainer
    from .metrics import peak_tflops

    plan = plan_run(cfg, env)
    init_process_group(env, plan.device, float(cfg.trainer.step_timeout_s))
    if env.distributed:  # rank 0's view of the checkpoints decides, so no rank resumes from another step
        import torch.distributed as dist

        decision = [plan.resume_from, plan.resume_fallbacks, plan.init_from]
        dist.broadcast_object_list(decision, src=0)
        plan.resume_from, plan.resume_fallbacks, plan.init_from = decision
    if cfg.trainer.checkpoint.verify:
        _verify_before_load(env, plan)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    torch.manual_seed(int(cfg.trainer.seed))  # dropout-free model: seeds the host-side RNG state only
    with torch.device("meta"):  # counts only
        probe = MiniMaxForCausalLM(plan.model_cfg)
    counts = probe.parameter_counts()
    flops_per_token = float(probe.flops_per_token(int(cfg.stage.seq_len)))
    param_dtype = plan.autocast_dtype or torch.float32
    layout = Layout(plan.layout, cfg, env, plan.model_cfg, plan.device, param_dtype)

    trainer = Trainer(
        cfg=cfg, env=env, device=plan.device, autocast_dtype=plan.autocast_dtype, layout=layout,
        stream=plan.stream, collate=plan.collate, lr_schedule=plan.lr_schedule,
        batch_schedule=plan.batch_schedule, logger=None, flops_per_token=flops_per_token,
        peak_tflops=peak_tflops(plan.device, cfg.logging), ckpt_root=plan.run_dir / "checkpoints",
        config_yaml=config_yaml, mixture=plan.mixture, eval_source=plan.eval_source)
    source = ("trainer.resume", plan.resume_from) if plan.resume_from else \
        ("trainer.init_from", plan.init_from[1]) if plan.init_from else None
    try:
        if plan.resume_from is not None:
            trainer.load(plan.resume_from)
        elif plan.init_from is not None and plan.init_from[0] == "checkpoint":
            layout.load_checkpoint(plan.init_from[1])  # weights and optimizer state; counters and data anew
        elif plan.init_from is not None:
            from parallel.hf_load import load_hf_weights

            load_hf_weights(layout.model, plan.init_from[1])  # each rank reads only its slices
            layout.optimizer.masters_from_parameters()
    except (RuntimeError, KeyError, ValueError, OSError, CheckpointException) as exc:  # e.g. another model shape
        failure = next(iter(getattr(exc, "failures", {}).values()), None)  # DCP: {rank: (error, traceback)}
        exc = failure[0] if isinstance(failure, tuple) else failure or exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{source[0]}: cannot load {source[1]} into this config: {first}") from None

    if env.is_main:  # the only process that writes files, and only once every input (the resume too) is good
        if cfg.trainer.resume == "auto" and plan.resume_from is None:
            say(f"trainer.resume=auto: no complete checkpoint in {plan.run_dir / 'checkpoints'}; starting fresh")
        try:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            (plan.run_dir / "config.yaml").write_text(config_yaml)
        except OSError as exc:
            raise ConfigError(f"trainer.run_dir={plan.run_dir}: cannot write there: {exc.strerror}") from None
        ckpt.remove_temp_folders(plan.run_dir / "checkpoints")  # a crash's leftovers; no save is in flight yet

    if env.is_main:
        say(f"run dir {plan.run_dir} | device {plan.device} x{env.world_size} | layout {plan.layout.description} | "
            f"dtype {'bf16' if plan.autocast_dtype else 'fp32'} (fp32 master weights) | optimizer {layout.optimizer_impl} | params "
            f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active (non-embedding) | "
            + (f"resumed from {plan.resume_from} (step {trainer.state.step})" if plan.resume_from else
               f"fresh start from {plan.init_from[1]}" if plan.init_from else "fresh start"))
    trainer.logger = RunLogger(cfg, plan.run_dir, env.is_main, trainer.state.step)
    success = False
    try:
        trainer.run()
        success = True
    finally:
        trainer.logger.close(success)
    if env.is_main and cfg.logging.plots:
        from .plot import write_plots

        try:
            write_plots(plan.run_dir, metrics_file=cfg.logging.metrics_file)
        except (ConfigError, OSError) as exc:  # plotting must not fail a finished run
            say(f"plots: {exc}")


def main_from_overrides(overrides: list[str]) -> int:
    """Run the trainer with Hydra-style overrides; returns the exit code (used by the CLI and by tests)."""
    from .loop import NonFiniteLoss, Preempted

    env = DistEnv()
    try:
        env = env_from_torchrun()
        cfg = compose_config(overrides)
        run(cfg, env)
        return 0
    except ConfigError as exc:
        if env.is_main:  # every rank sees the same bad input; say it once
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as exc:
        if env.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    except Preempted as exc:
        if env.is_main:
            print(str(exc), file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if env.is_main:
            print("interrupted (a second Ctrl-C): the newest complete checkpoint is in the run dir's checkpoints/",
                  file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        shutdown()


def _print_config(overrides: list[str]) -> int:
    try:
        print(OmegaConf.to_yaml(compose_config(overrides), resolve=True), end="")
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nUsage: python -m trainer.train [key=value ...] [--cfg]   "
              "(--cfg prints the resolved config)\nConfig tree: " + str(Path(__file__).parent.parent / "conf"))
        return 0
    if "--cfg" in argv:
        return _print_config([a for a in argv if a != "--cfg"])
    return main_from_overrides(argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
