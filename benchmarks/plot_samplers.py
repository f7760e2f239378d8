"""Each seed of some harness rows, with the fast sampler and with 1,000 DDPM steps: does the ranking hold for both?

    python benchmarks/plot_samplers.py RUN_A/runs.jsonl RUN_B/runs.jsonl --rows default plain-mse \\
        --out docs/recipes-loss-by-sampler.png

Reads the `runs.jsonl` that `bench_recipes.py` writes (several runs' files pool their seeds; a (row, seed, sampler)
seen twice keeps the first) and draws, for FD_digits and the share of samples read with confidence >= 0.9, one bar
per row and sampler (the mean over seeds), each seed as a dot, and the real digits as a line. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench_recipes import read_runs

SAMPLERS = {"dpm-solver-sde-20": "SDE-DPM-Solver++, 20 steps", "ddpm-1000": "DDPM, 1,000 steps"}
METRICS = {"frechet_distance": "FD_digits (lower is better)",
           "confident_share": "share read with confidence >= 0.9 (higher: better)"}
COLOURS = ("tab:blue", "tab:gray", "tab:green", "tab:orange")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="runs.jsonl files of bench_recipes.py")
    parser.add_argument("--rows", nargs="+", default=["default", "plain-mse"], help="rows to draw (at most 4)")
    parser.add_argument("--out", type=Path, default=Path("recipes-by-sampler.png"), help="the PNG to write")
    args = parser.parse_args()
    if len(args.rows) > len(COLOURS):
        parser.error(f"--rows: at most {len(COLOURS)} rows, got {len(args.rows)}.")
    runs: dict[tuple[str, int, str], dict] = {}
    for path in args.runs:
        if not path.is_file():
            parser.error(f"{path} does not exist: give the runs.jsonl of a bench_recipes.py --out folder.")
        for run in read_runs(path):
            runs.setdefault((run["row"], run["seed"], run["sampler"]), run)
    missing = [row for row in args.rows if not any(key[0] == row for key in runs)]
    if missing:
        parser.error(f"no runs of {missing} in {[str(p) for p in args.runs]}; rows there: "
                     f"{sorted({key[0] for key in runs} - {'floor'})}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        parser.error("matplotlib is not installed: pip install ddpm_hf[plots]")

    floor = runs.get(("floor", 0, "real"))
    figure, axes = plt.subplots(1, len(METRICS), figsize=(10, 4.4))
    width = len(args.rows) + 1
    for axis, (metric, label) in zip(axes, METRICS.items()):
        for i, sampler in enumerate(SAMPLERS):
            for j, (row, colour) in enumerate(zip(args.rows, COLOURS)):
                values = [run[metric] for (name, _, used), run in runs.items() if name == row and used == sampler]
                if not values:
                    continue
                x = i * width + j
                axis.bar(x, statistics.mean(values), color=colour, alpha=0.5, label=row if i == 0 else None)
                axis.scatter([x] * len(values), values, color=colour, edgecolor="black", zorder=3, s=18)
        if floor is not None:
            axis.axhline(floor[metric], color="black", linestyle="--", label="real digits")
        axis.set_xticks([i * width + (len(args.rows) - 1) / 2 for i in range(len(SAMPLERS))], list(SAMPLERS.values()))
        axis.set_ylabel(label)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(loc="lower center", fontsize=8, framealpha=0.9)
    seeds = len({seed for (name, seed, _) in runs if name in args.rows})
    figure.suptitle(f"{' against '.join(args.rows)}: the same wall-clock budget, {seeds} seeds (dots), both samplers")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
