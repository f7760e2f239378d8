"""The quality bar: the README's main job against real digits (the floor) and a diffusers-style loop (the peer).

    python benchmarks/bench_quality.py                                         # the bar, on a CPU
    python benchmarks/bench_quality.py --max_train_steps 300 --inference_steps 100   # a quick look
    python benchmarks/bench_quality.py --sweep                                 # and the sweep of ddpm_hf's model
    python benchmarks/bench_quality.py --model outputs/ddpm-digits --sweep     # floor, that model and its sweep only

Rows, each scored against the embedded digits' train split (1,437 images) with the shipped digits
classifier's features, from the same number of images (360 by default, the size of the held-out split):

- floor: the 360 held-out real digits. No model can be expected to beat real data.
- ddpm_hf: `ddpm_hf.training.train` with the README main job's defaults (the `tiny` UNet on the
  embedded 16 px digits; `TrainingConfig()`), EMA weights.
- peer: the loop of diffusers' `examples/unconditional_image_generation/train_unconditional.py`
  (benchmarks/peer.py) on diffusers' own `UNet2DModel` and `DDPMScheduler`, with the same data, number of steps
  and seed, in two settings (`--peer`): tuned as a careful user would for a short run (2 ResNet blocks per stage,
  AdamW lr 1e-3, 100 warmup steps, cosine, EMA up to 0.999 with power 3/4, batch 64, clipping at 1) and the
  example's defaults (lr 1e-4, 500 warmup steps, EMA up to 0.9999), which are made for runs a hundred times
  longer. For the same wall-clock time rather than the same steps, see bench_recipes.py.

With `--sweep`, ddpm_hf's model is also sampled with every sampler of `ddpm-hf sweep` (ddpm, ddim, dpm-solver,
dpm-solver-sde, unipc, euler-ancestral) at 5, 10, 20, 50 and 1000 steps, from the same seeds, and the script checks
the fast-sampling targets: some sampler within the floor's standard deviation of the 1000-step DDPM distance with
at most 10 model calls, one at least as good with at most 20, and evaluation of 360 samples with the fast sampler
in under 10% of the training time. It writes the sweep's JSON beside the model and the curve to `--plot`
(docs/sampler_sweep.png, which the README shows). Seconds are of this machine and its load at the time.

Both models sample with the 1000-step ancestral DDPM sampler (or `--sampler ddim`), image i from seed i.
The peer samples through ddpm_hf's `DDPMPipeline` loop around diffusers' components (the same loop as
diffusers' pipeline, which cannot return tensors). Prints a table and one JSON line per row; ddpm_hf must be at
least as good as the peer (a lower Fréchet distance).

On a CPU shared with other work, `OMP_NUM_THREADS=1` is often faster than the default.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers

from peer import DEFAULTS, TUNED, train_peer

from ddpm_hf import DDPMPipeline
from ddpm_hf.evaluation import EvaluationResult, digits_split, evaluate_images, evaluate_pipeline, sweep_samplers
from ddpm_hf.evaluation.plots import plot_sweep
from ddpm_hf.evaluation.sweep import SamplerSweep
from ddpm_hf.hub import read_training_metadata
from ddpm_hf.pipelines.fast_sampler import SWEEP_FILE
from ddpm_hf.schedulers.samplers import EVAL_SAMPLER, EVAL_STEPS, SWEEP_SAMPLERS, SWEEP_STEPS
from ddpm_hf.training import TrainingConfig, train
from ddpm_hf.utils.atomic_files import write_json_atomically

SAMPLERS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}
PEERS = {"tuned": TUNED, "defaults": DEFAULTS}
COLUMNS = ("frechet_distance", "kid", "precision", "recall", "confidence", "class_coverage")


@dataclass
class Row:
    name: str
    result: EvaluationResult
    train_seconds: float | None = None
    sample_seconds: float | None = None

    def to_json(self) -> str:
        return json.dumps({"row": self.name, "train_seconds": self.train_seconds,
                           "sample_seconds": self.sample_seconds, **self.result.to_dict()})


def floor_row(args: argparse.Namespace, training: TrainingConfig) -> Row:
    """The held-out real digits, scored like samples."""
    images, _ = digits_split("test")
    return Row("floor: held-out real digits", evaluate_images(images[: args.num_samples], cache_dir=args.cache_dir))


def ours_row(args: argparse.Namespace, training: TrainingConfig) -> Row:
    """Train with the README main job's settings (or load `--model`) and score the saved EMA pipeline; with
    `--sweep`, sweep it too, and take the row from the sweep's pair of the same sampler and steps."""
    if args.model is not None:
        pipeline = DDPMPipeline.from_pretrained(args.model)
        train_seconds = read_training_metadata(args.model).get("training_time_seconds")
    else:
        start = time.perf_counter()
        pipeline = train(training)
        if pipeline is None:
            raise SystemExit("Training was stopped by a signal; the benchmark has no model to score.")
        train_seconds = round(time.perf_counter() - start, 1)
    name = "ddpm_hf: README main job"
    if not args.sweep:
        return score(name, pipeline, args, train_seconds)
    sweep = sweep_ours(pipeline, args, train_seconds)
    same = sweep.point(args.sampler, args.inference_steps)
    return score(name, pipeline, args, train_seconds) if same is None else Row(name, same.result, train_seconds,
                                                                                same.seconds)


def peer_rows(args: argparse.Namespace, training: TrainingConfig) -> list[Row]:
    """Train with the train_unconditional loop (benchmarks/peer.py) on the same number of steps, as the `--peer`
    settings say, and score its EMA weights."""
    rows = []
    for name in PEERS if args.peer == "both" else (args.peer,):
        start = time.perf_counter()
        pipeline, _ = train_peer(training, PEERS[name])
        rows.append(score(f"peer: diffusers train_unconditional, {name}", pipeline, args, time.perf_counter() - start))
    return rows


def score(name: str, pipeline: DDPMPipeline, args: argparse.Namespace, train_seconds: float | None) -> Row:
    original = pipeline.scheduler
    pipeline.scheduler = SAMPLERS[args.sampler].from_config(pipeline.scheduler.config)
    start = time.perf_counter()
    result = evaluate_pipeline(pipeline, args.num_samples, num_inference_steps=args.inference_steps,
                               cache_dir=args.cache_dir, show_progress=True)
    pipeline.scheduler = original
    return Row(name, result, None if train_seconds is None else round(train_seconds, 1),
               round(time.perf_counter() - start, 1))


def sweep_ours(pipeline: DDPMPipeline, args: argparse.Namespace, train_seconds: float | None) -> SamplerSweep:
    """Every sampler and step count on ddpm_hf's model, its table, curve and JSON, and the fast-sampling targets."""
    pairs = None  # every sampler with every step count, as `ddpm-hf sweep` does
    if args.sweep_pairs == "short":
        pairs = [(name, steps) for name in SWEEP_SAMPLERS for steps in SWEEP_STEPS] + [("ddpm", 1000)]
    sweep = sweep_samplers(pipeline, pairs=pairs, num_samples=args.num_samples, cache_dir=args.cache_dir,
                           show_progress=True)
    print(sweep.report())
    write_json_atomically(args.output_dir / SWEEP_FILE, sweep.to_dict())
    plot_sweep(sweep, args.plot, title=f"The README main job's model: samplers on {args.num_samples} samples")
    print(f"Wrote {args.output_dir / SWEEP_FILE} and {args.plot}.")
    check_targets(sweep, train_seconds)
    return sweep


def check_targets(sweep: SamplerSweep, train_seconds: float | None):
    """Print whether the sweep meets the fast-sampling targets of the README."""
    baseline, std = sweep.point("ddpm", sweep.num_train_timesteps), sweep.floor.std
    for calls, bound, what in ((10, baseline.frechet_distance + std, "within the floor's std of"),
                               (20, baseline.frechet_distance, "at least as good as")):
        best = min((p for p in sweep.points if p.model_calls <= calls), key=lambda p: p.frechet_distance)
        verdict = "met" if best.frechet_distance <= bound else "NOT met"
        print(f"Target {verdict}: at <= {calls} model calls, {what} {sweep.num_train_timesteps} DDPM steps "
              f"(FD {baseline.frechet_distance:.2f}, floor std {std:.2f}): best {best.sampler}, {best.steps} steps, "
              f"FD {best.frechet_distance:.2f}.")
    fast = sweep.point(EVAL_SAMPLER, EVAL_STEPS)
    if fast is not None and train_seconds:
        verdict = "met" if fast.seconds < 0.1 * train_seconds else "NOT met"
        share = 100 * fast.seconds / train_seconds
        print(f"Target {verdict} (timing of this machine, under its load): sampling {sweep.num_samples} images with "
              f"{EVAL_SAMPLER}, {EVAL_STEPS} steps took {fast.seconds:.1f} s, {share:.1f}% of the "
              f"{train_seconds:.0f} s of training.")


def print_table(rows: list[Row]):
    header = f"{'row':<44} {'train s':>8} {'sample s':>9} " + " ".join(f"{c:>16}" for c in COLUMNS)
    print(header)
    for row in rows:
        values = row.result.metrics()
        times = " ".join(f"{'' if t is None else f'{t:.0f}':>{w}}" for t, w in ((row.train_seconds, 8),
                                                                                  (row.sample_seconds, 9)))
        print(f"{row.name:<44} {times} " + " ".join(f"{values[c]:>16.4f}" for c in COLUMNS))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_train_steps", type=int, help="training steps for both models (default: the "
                        "README main job's, TrainingConfig().max_train_steps)")
    parser.add_argument("--num_samples", type=int, default=360, help="images per row (default: 360)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="how both models sample (default: ddpm)")
    parser.add_argument("--inference_steps", type=int, default=1000, help="sampling steps (default: 1000)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/bench_quality"),
                        help="where the trained ddpm_hf pipeline and the reference cache go")
    parser.add_argument("--model", type=Path, help="score this saved README main-job pipeline instead of training "
                        "one (the peer, which would need training, is left out)")
    parser.add_argument("--peer", choices=("tuned", "defaults", "both"), default="both",
                        help="the peer's settings: tuned for a short run, the example's defaults, or both rows "
                             "(default: both; see benchmarks/peer.py)")
    parser.add_argument("--sweep", action="store_true", help="also sweep every sampler and step count on ddpm_hf's "
                        "model and check the fast-sampling targets")
    parser.add_argument("--sweep_pairs", choices=("full", "short"), default="full", help="full: every sampler at "
                        "5, 10, 20, 50 and 1000 steps, as `ddpm-hf sweep`; short: every sampler at 5, 10, 20 and 50, "
                        "and ddpm at 1000 (the baseline), a quarter of the sampling (default: full)")
    parser.add_argument("--plot", type=Path, default=Path("docs/sampler_sweep.png"),
                        help="where the sweep's curve goes (default: docs/sampler_sweep.png)")
    return parser.parse_args()


def main():
    args = parse_args()
    args.cache_dir = args.output_dir / "reference_stats"
    steps = {} if args.max_train_steps is None else {"max_train_steps": args.max_train_steps}
    # The README main job's settings. Only its sample grids are made cheaper (none during training, 100 steps
    # at the end): they use their own generator, so the trained weights are those of the default run.
    training = TrainingConfig(output_dir=str(args.output_dir / "ddpm_hf"), overwrite_output_dir=True, logger="none",
                              save_images_steps=10**9, ddpm_num_inference_steps=100, **steps)
    rows = []
    for make_row in (floor_row, ours_row) if args.model else (floor_row, ours_row, peer_rows):
        made = make_row(args, training)
        for row in made if isinstance(made, list) else [made]:
            rows.append(row)
            print(row.to_json(), flush=True)
    print_table(rows)
    ours = rows[1].result.frechet_distance
    for peer in rows[2:]:
        verdict = "at least as good as" if ours <= peer.result.frechet_distance else "WORSE than"
        print(f"ddpm_hf (FD {ours:.2f}) is {verdict} {peer.name} (FD {peer.result.frechet_distance:.2f}) after "
              f"{training.max_train_steps} steps, sampled with {args.inference_steps} {args.sampler} steps.")


if __name__ == "__main__":
    main()
