"""The ablation harness: which training recipe gives the best samples for the same wall-clock budget, by evidence.

    python benchmarks/bench_recipes.py                # every row, 2 seeds, the main job's budget (hours on 2 cores)
    python benchmarks/bench_recipes.py --rows default peer-tuned --seeds 0 --minutes 1   # a quick look

Every row trains on the README main job's data (the embedded 16 px digits) for the same wall-clock budget (by
default the main job's, `--minutes`), through `--max_train_minutes`: a calibration sets each run's length to the
steps that fit, so a slower recipe trains fewer steps, as it would for a user. Rows change one thing against
ddpm_hf's defaults; the peer rows are diffusers' train_unconditional loop (benchmarks/peer.py), tuned as a careful
user would for a short run (UNet2DModel with 2 ResNet blocks per stage, AdamW lr 1e-3, betas (0.95, 0.999),
weight decay 1e-6, cosine with 100 warmup steps, EMAModel 0.999 with warm-up power 3/4, batch 64, clipping at 1),
and with the example's defaults (lr 1e-4, 500 warmup steps, EMA 0.9999).

Each run is scored on `--num_samples` (>= 360) samples, image i from seed i, against the digits' train split in the
shipped digits classifier's features (FD_digits, KID, precision/recall), and by the classifier itself: its mean
confidence, the share of samples it reads with probability >= 0.9, and the share of the ten digits it reads. All
rows sample with the fast sampler (`--sampler`, `--steps`); the `--top` best rows, the default and the tuned peer
also with 1,000 ancestral DDPM steps, and the default's models also with sigma_t^2 = beta_t (`fixed_large`).
Rows report the mean and the standard deviation over seeds. Results are appended to OUT/runs.jsonl as they come (a
rerun skips what is there), then printed as a Markdown table and drawn (with matplotlib) to OUT/recipes.png.

Run it on an idle machine: the budget is wall-clock time, so other load shortens every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.state import AcceleratorState
from peer import DEFAULTS, TUNED, PeerConfig, train_peer

from ddpm_hf import DDPMPipeline
from ddpm_hf.evaluation import digits_split, evaluate_images, evaluate_pipeline
from ddpm_hf.schedulers.samplers import EVAL_SAMPLER, EVAL_STEPS, SAMPLERS, get_sampler
from ddpm_hf.training import TrainingConfig, load_unet_config, train

METRICS = ("frechet_distance", "kid", "precision", "recall", "confidence", "confident_share", "class_coverage")


@dataclass(frozen=True)
class Row:
    """One recipe: what it changes against ddpm_hf's defaults (or a peer), and how much of the budget it gets."""

    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainingConfig fields
    unet: dict[str, Any] = field(default_factory=dict)  # changes to the `tiny` UNet preset
    peer: PeerConfig | None = None
    budget_share: float = 1.0


ROWS = {row.name: row for row in (
    Row("default", "ddpm_hf's defaults: the README main job"),
    Row("default-half", "ddpm_hf's defaults, half the budget", budget_share=0.5),
    Row("peer-tuned", "diffusers train_unconditional loop, tuned for a short run", peer=TUNED),
    Row("peer-defaults", "diffusers train_unconditional loop, its defaults", peer=DEFAULTS),
    Row("plain-mse", "plain MSE, without the default min-SNR-5 weights (Hang et al. 2023)", {"snr_gamma": None}),
    Row("v-prediction", "v-prediction (Salimans & Ho 2022)", {"prediction_type": "v_prediction"}),
    Row("cosine-betas", "the cosine schedule (Nichol & Dhariwal 2021)", {"ddpm_beta_schedule": "squaredcos_cap_v2"}),
    Row("learned-variances", "learned_range variances, L_simple + 0.001 L_vlb (Nichol & Dhariwal 2021)",
        {"variance_type": "learned_range"}),
    Row("wider", "block_out_channels (48, 96, 96) instead of (32, 64, 64)", unet={"block_out_channels": (48, 96, 96)}),
    Row("deeper", "2 ResNet blocks per stage instead of 1", unet={"layers_per_block": 2}),
    Row("lr-1e-3", "learning rate 1e-3 instead of 2e-3", {"learning_rate": 1e-3}),
    Row("lr-4e-3", "learning rate 4e-3 instead of 2e-3", {"learning_rate": 4e-3}),
    Row("ema-0.9995", "EMA decay up to 0.9995 instead of 0.999", {"ema_max_decay": 0.9995}),
    Row("batch-32", "batch 32 instead of 64", {"train_batch_size": 32}),
    Row("batch-128", "batch 128 instead of 64", {"train_batch_size": 128}),
    Row("bf16", "bf16 autocast on the CPU", {"mixed_precision": "bf16"}),
)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds per row (default: 0 1)")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="the wall-clock budget of every run (default: 5, the README main job's training)")
    parser.add_argument("--num_samples", type=int, default=360, help="samples scored per run (default: 360)")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default=EVAL_SAMPLER,
                        help=f"the fast sampler every row is scored with (default: {EVAL_SAMPLER}, evaluation's)")
    parser.add_argument("--steps", type=int, default=EVAL_STEPS, help=f"its steps (default: {EVAL_STEPS})")
    parser.add_argument("--top", type=int, default=3, help="rows also scored with 1,000 DDPM steps (default: 3)")
    parser.add_argument("--ddpm_seeds", nargs="*", type=int,
                        help="the seeds whose models are scored with 1,000 DDPM steps (default: every seed; none "
                             "given: none, which a later run with the same --out can add)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_recipes"), help="runs, models and the plot")
    parser.add_argument("--plot", type=Path, help="also save the plot here (e.g. docs/recipes.png)")
    args = parser.parse_args()
    if args.num_samples < 2:
        parser.error("--num_samples must be at least 2")
    return args


def training_config(row: Row, seed: int, args: argparse.Namespace, output_dir: Path) -> TrainingConfig:
    """The main job's settings with the row's changes, for the row's share of the budget. Nothing that costs time
    without training happens on the way (no sample grids, checkpoints or trackers), and the final grid is cheap."""
    overrides = dict(row.overrides)
    if row.unet:
        config_file = output_dir.parent / f"{row.name}-unet.json"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps({**load_unet_config("tiny"), **row.unet}), encoding="utf-8")
        overrides["model_config"] = str(config_file)
    return TrainingConfig(seed=seed, max_train_steps=10**9, max_train_minutes=args.minutes * row.budget_share,
                          output_dir=str(output_dir), overwrite_output_dir=True, logger="none",
                          save_images_steps=10**9, checkpointing_steps=10**9, ddpm_num_inference_steps=20,
                          eval_at_end=False, **overrides)


def train_row(row: Row, seed: int, args: argparse.Namespace) -> tuple[DDPMPipeline, int, float]:
    output_dir = args.out / "runs" / f"{row.name}-seed{seed}"
    config = training_config(row, seed, args, output_dir)
    started = time.perf_counter()
    if row.peer is not None:
        pipeline, steps = train_peer(config, row.peer, max_minutes=config.max_train_minutes)
        pipeline.save_pretrained(output_dir)  # for the 1,000-step scoring, perhaps in a later run
    else:
        # Accelerate's state is a process-wide singleton, fixed by the first run (mixed precision, say): each row
        # sets up its own, as a fresh `python examples/train.py` would.
        AcceleratorState._reset_state(reset_partial_state=True)
        pipeline = train(config)
        steps = json.loads((output_dir / "training_config.json").read_text())["global_step"]
    return pipeline, steps, time.perf_counter() - started


def score(pipeline: DDPMPipeline, sampler: str, steps: int, args: argparse.Namespace,
          variance_type: str | None = None) -> dict[str, Any]:
    """The metrics of `num_samples` samples of `pipeline` with `sampler` (seconds included)."""
    config = dict(pipeline.scheduler.config)
    if variance_type is not None:
        config["variance_type"] = variance_type
    pipeline.scheduler = get_sampler(sampler).make_scheduler(config)
    started = time.perf_counter()
    result = evaluate_pipeline(pipeline, args.num_samples, num_inference_steps=steps, cache_dir=args.out / "stats")
    return {**{name: getattr(result, name) for name in METRICS}, "sample_seconds": time.perf_counter() - started}


def main() -> None:
    args = parse_args()
    runs_file = args.out / "runs.jsonl"
    runs_file.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["row"], r["seed"], r["sampler"]) for r in read_runs(runs_file)}

    def record(entry: dict[str, Any]) -> None:
        with runs_file.open("a") as file:
            file.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    if ("floor", 0, "real") not in done:
        real, _ = digits_split("test")
        result = evaluate_images(real[: args.num_samples], cache_dir=args.out / "stats")
        record({"row": "floor", "seed": 0, "sampler": "real", **{name: getattr(result, name) for name in METRICS}})

    fast = f"{args.sampler}-{args.steps}"
    models: dict[tuple[str, int], DDPMPipeline] = {}
    for name in args.rows:
        row = ROWS[name]
        for seed in args.seeds:
            if (name, seed, fast) in done:
                continue
            pipeline, steps, seconds = train_row(row, seed, args)
            models[name, seed] = pipeline
            record({"row": name, "seed": seed, "sampler": fast, "train_steps": steps, "train_seconds": seconds,
                    **score(pipeline, args.sampler, args.steps, args)})

    # 1,000 ancestral steps for the best rows (by the fast sampler), the default and the tuned peer.
    runs = read_runs(runs_file)
    fast_runs = {name: [r["frechet_distance"] for r in runs if r["row"] == name and r["sampler"] == fast]
                 for name in args.rows}
    fast_means = {name: statistics.mean(distances) for name, distances in fast_runs.items() if distances}
    best = sorted(fast_means, key=fast_means.get)[: args.top]
    for name in dict.fromkeys([*best, "default", "peer-tuned"]):
        if name not in args.rows:
            continue
        for seed in args.seeds if args.ddpm_seeds is None else args.ddpm_seeds:
            for sampler, variance in (("ddpm-1000", None), ("ddpm-1000-fixed_large", "fixed_large")):
                if (name, seed, sampler) in done or (variance and name != "default"):
                    continue
                pipeline = models.get((name, seed)) or load_model(args, ROWS[name], seed)
                record({"row": name, "seed": seed, "sampler": sampler, **score(pipeline, "ddpm", 1000, args, variance)})

    runs = read_runs(runs_file)
    print(markdown_table(runs, fast))
    plot(runs, fast, args.out / "recipes.png", args.plot)


def read_runs(runs_file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []


def load_model(args: argparse.Namespace, row: Row, seed: int) -> DDPMPipeline:
    """A trained row's pipeline, as training saved it."""
    return DDPMPipeline.from_pretrained(args.out / "runs" / f"{row.name}-seed{seed}")


def summarise(runs: list[dict[str, Any]], row: str, sampler: str) -> dict[str, tuple[float, float]] | None:
    """Mean and standard deviation over seeds of each metric, for one row and sampler."""
    entries = [r for r in runs if r["row"] == row and r["sampler"] == sampler]
    if not entries:
        return None
    keys = [*METRICS, "train_steps"]
    return {key: (statistics.mean(e[key] for e in entries),
                  statistics.stdev(e[key] for e in entries) if len(entries) > 1 else 0.0)
            for key in keys if all(e.get(key) is not None for e in entries)} | {"seeds": (len(entries), 0)}


def markdown_table(runs: list[dict[str, Any]], fast: str) -> str:
    lines = ["| row | sampler | seeds | steps | FD_digits | KID | precision | recall | confidence | read >= 0.9 | "
             "classes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = list(dict.fromkeys(r["row"] for r in runs))
    for sampler in ("real", fast, "ddpm-1000", "ddpm-1000-fixed_large"):
        for row in rows:
            summary = summarise(runs, row, sampler)
            if summary is None:
                continue
            cell = lambda key, digits=2: "n/a" if key not in summary else (  # noqa: E731
                f"{summary[key][0]:.{digits}f}" + (f" ± {summary[key][1]:.{digits}f}" if summary[key][1] else ""))
            lines.append(f"| {row} | {sampler} | {summary['seeds'][0]} | {cell('train_steps', 0)} | "
                         f"{cell('frechet_distance')} | {cell('kid', 1)} | {cell('precision')} | {cell('recall')} | "
                         f"{cell('confidence', 3)} | {cell('confident_share', 3)} | {cell('class_coverage')} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], fast: str, path: Path, copy_to: Path | None) -> None:
    """Two panels per row, with the seeds' standard deviation: FD_digits (lower is better) and the share of samples
    read with confidence >= 0.9 (higher is better), the floor (real digits) as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install ddpm_hf[plots]): no plot.")
        return
    rows = [row for row in dict.fromkeys(r["row"] for r in runs) if summarise(runs, row, fast)]
    summaries = {row: summarise(runs, row, fast) for row in rows}
    rows.sort(key=lambda row: summaries[row]["frechet_distance"][0])
    floor = summarise(runs, "floor", "real")
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    for axis, key, label in ((axes[0], "frechet_distance", "FD_digits (lower is better)"),
                             (axes[1], "confident_share", "share read with confidence >= 0.9 (higher is better)")):
        means = [summaries[row][key][0] for row in rows]
        errors = [summaries[row][key][1] for row in rows]
        colours = ["tab:orange" if row.startswith("peer") else "tab:blue" for row in rows]
        axis.barh(rows, means, xerr=errors, color=colours, capsize=3)
        if floor and key in floor:
            axis.axvline(floor[key][0], color="black", linestyle="--", label="real digits")
            axis.legend(loc="lower right")
        axis.set_xlabel(label)
    axes[0].invert_yaxis()
    figure.suptitle(f"Same wall-clock budget, {fast} sampler; mean and sd over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    if copy_to is not None:
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(copy_to, dpi=120)
    plt.close(figure)
    print(f"Wrote {path}" + (f" and {copy_to}" if copy_to else ""))


if __name__ == "__main__":
    main()
