"""`python -m trainer.plot <run_dir> [out=<dir>]`: PNGs of a run's `metrics.jsonl`, one per panel, against tokens
seen (step on the top axis), in `<run_dir>/plots/` unless `out=` says otherwise. Keys a run lacks are skipped."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .config import ConfigError, command_line

# file stem, title, y label, y scale, percent axis, series keys
PANELS = (
    ("loss", "Loss", "cross-entropy (nats/token)", "linear", False, ("loss", "val/loss")),
    ("val_ppl", "Validation perplexity", "perplexity", "log", False, ("val/ppl",)),
    ("lr", "Learning rate", "learning rate", "log", False, ("lr",)),
    ("global_batch_tokens", "Global batch", "tokens per step", "linear", False, ("global_batch_tokens",)),
    ("tokens_per_s", "Throughput", "tokens/s (all ranks)", "linear", False, ("tokens_per_s",)),
    ("mfu", "Model FLOPs utilisation", "MFU", "linear", True, ("mfu",)),
    ("drop_rate", "Dropped tokens (expert capacity)", "share of routed tokens", "linear", True, ("drop_rate",)),
    ("expert_load", "Expert load share (1/E: balanced)", "share of routed tokens", "linear", False,
     ("moe/load_share_max", "moe/load_share_mean", "moe/load_share_min")),
    ("grad_norm", "Gradient norm (before clipping)", "L2 norm", "log", False, ("grad_norm",)),
    ("aux_loss", "Load-balancing aux loss", "aux loss", "linear", False, ("aux_loss",)),
)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"no metrics file {path}")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no metrics rows")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(tokens, value) of the rows that carry `key`; rows without `tokens` (e.g. validation rows) take it from
    the training row of their step; a null (non-finite) value leaves a gap."""
    tokens_at = {r["step"]: r["tokens"] for r in rows if "step" in r and "tokens" in r}
    xs, ys = [], []
    for row in rows:
        x = row.get("tokens", tokens_at.get(row.get("step")))
        if key in row and x is not None:
            xs.append(x)
            ys.append(math.nan if row[key] is None else float(row[key]))
    return xs, ys


def write_plots(run_dir, out=None, metrics_file: str = "metrics.jsonl") -> dict[str, list[str]]:
    """Writes one PNG per panel with data into `out` (default `<run_dir>/plots`), each under a temporary name then
    renamed; returns {file name: the series keys drawn in it}. Raises ConfigError before writing anything when
    the run dir or its metrics are missing or empty."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state (Agg via savefig)
    from matplotlib.ticker import PercentFormatter

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} is not a directory")
    rows = read_rows(run_dir / metrics_file)
    panels = []
    for stem, title, ylabel, yscale, percent, keys in PANELS:
        drawn = [(key, *series(rows, key)) for key in keys]
        drawn = [(key, xs, ys) for key, xs, ys in drawn if any(math.isfinite(y) for y in ys)]
        if drawn:
            panels.append((stem, title, ylabel, yscale, percent, drawn))
    if not panels:
        raise ConfigError(f"{run_dir / metrics_file} holds none of the plotted keys")

    steps = sorted({(0, 0)} | {(r["tokens"], r["step"]) for r in rows if "tokens" in r and "step" in r})
    tok, st = [t for t, _ in steps], [s for _, s in steps]
    monotone = bool(np.all(np.diff(tok) > 0) and np.all(np.diff(st) > 0))  # for the step axis
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, title, ylabel, yscale, percent, drawn in panels:
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for key, xs, ys in drawn:
            sparse = key.startswith("val/")  # validation runs every few steps: mark its points
            ax.plot(xs, ys, marker="o" if sparse else None, markersize=3, linewidth=1.5 if sparse else 1, label=key)
        ax.set_title(f"{title} - {run_dir.resolve().name}")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(ylabel)
        ax.set_yscale(yscale)
        ax.set_xlim(0, max(max(xs) for _, xs, _ in drawn))
        if percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if monotone:
            top = ax.secondary_xaxis("top", functions=(lambda t: np.interp(t, tok, st), lambda s: np.interp(s, st, tok)))
            top.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
        if len(drawn) > 1:
            ax.legend()
        path = out / f"{stem}.png"
        tmp = out / f".{stem}.png.tmp"
        try:
            fig.savefig(tmp, format="png", dpi=110)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written[path.name] = [line.get_label() for line in ax.get_lines()]
    return written


def main(argv: list[str] | None = None) -> int:
    def run(args):
        run_dir, out = None, None
        for arg in args:
            if arg.startswith("out="):
                out = arg[len("out="):]
            elif run_dir is None and "=" not in arg:
                run_dir = arg
            else:
                raise ConfigError(f"unexpected argument {arg!r}; usage: python -m trainer.plot <run_dir> [out=<dir>]")
        if run_dir is None:
            raise ConfigError("usage: python -m trainer.plot <run_dir> [out=<dir>]")
        try:
            written = write_plots(run_dir, out)
        except OSError as exc:
            raise ConfigError(str(exc)) from None
        print(f"wrote {len(written)} plots to {Path(out) if out else Path(run_dir) / 'plots'}: {', '.join(written)}")
        return 0

    return command_line(__doc__, argv, run)


if __name__ == "__main__":
    sys.exit(main())
