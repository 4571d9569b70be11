"""Summarise training runs from their metrics.jsonl: median throughput over steady-state steps.

    python bench/summarize_runs.py NAME=RUN_DIR[:GPUS] ... [--skip 5] [--json out.json]

Prints a table (tokens/s per GPU, TFLOP/s per GPU, MFU, peak memory, first-step loss, scaling efficiency
against the first run listed, median MoE drop rate over all steps) and writes the same numbers as JSON.
"""

import argparse
import json
import statistics
from pathlib import Path


def summarize(run_dir: Path, gpus: int, skip: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = rows[skip:] or rows

    def med(key):
        return statistics.median(r[key] for r in steady)

    return {
        "steps": len(rows), "gpus": gpus, "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
        "tokens_per_s": med("tokens_per_s"), "tokens_per_s_per_gpu": med("tokens_per_s") / gpus,
        "tflops_per_gpu": med("tflops_per_device"), "mfu": med("mfu"), "memory_gib": max(r["memory_gib"] for r in rows),
        "drop_rate": statistics.median(r["drop_rate"] for r in rows),  # all steps: drops are highest early
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR[:GPUS]")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    for spec in args.runs:
        name, _, rest = spec.partition("=")
        path, _, gpus = rest.partition(":")
        results[name] = summarize(Path(path), int(gpus or 1), args.skip)
    base = next(iter(results.values()))["tokens_per_s_per_gpu"]
    print(f"{'run':<14}{'gpus':>5}{'steps':>6}{'tok/s/GPU':>12}{'TFLOP/s/GPU':>13}{'MFU':>7}{'mem GiB':>9}"
          f"{'loss@1':>9}{'loss@end':>9}{'drop':>7}{'scaling':>9}")
    for name, r in results.items():
        r["scaling_vs_first"] = r["tokens_per_s_per_gpu"] / base
        print(f"{name:<14}{r['gpus']:>5}{r['steps']:>6}{r['tokens_per_s_per_gpu']:>12.0f}{r['tflops_per_gpu']:>13.1f}"
              f"{100 * r['mfu']:>6.1f}%{r['memory_gib']:>9.1f}{r['first_loss']:>9.4f}{r['last_loss']:>9.4f}"
              f"{100 * r['drop_rate']:>6.2f}%{r['scaling_vs_first']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
