"""The `sample`, `evaluate`, `sweep` and `noise` subcommands of `ddpm-hf`.

    ddpm-hf sample MODEL [--num-images N] [--batch-size B] [--steps S] [--scheduler ddim] [--fast] [--seed X]
                         [--out DIR_OR_GRID.png] [--gif PATH] [--strip PATH]
    ddpm-hf evaluate MODEL [--reference digits|HUB_ID|FOLDER] [--split SPLIT] [--features digits|inception]
                           [--num-samples N] [--steps S] [--scheduler ddim] [--fast] [--output metrics.json]
    ddpm-hf sweep MODEL [--samplers ddpm,ddim,...] [--steps 5,10,...] [--num-samples N] [--reference ...]
                        [--out DIR] [--save]
    ddpm-hf noise MODEL IMAGE [--timesteps 0,100,...] [--out noising.png]

MODEL is a folder written by `save_pretrained` (a training run's --output_dir) or a Hub repo id.
Each `add_<name>_command(subparsers)` declares its arguments and sets `run` to the function that runs it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .evaluation import evaluate_pipeline, generate_images
from .evaluation.features import FEATURE_EXTRACTORS, INCEPTION_WEIGHTS_ENV
from .evaluation.floor import default_floor_split, format_quality
from .evaluation.plots import CAN_PLOT, plot_sweep
from .evaluation.sweep import SamplerSweep, sweep_samplers
from .hub import is_generated_card, write_model_card
from .hub.card import CARD_NAME
from .pipelines import DDPMPipeline
from .pipelines.fast_sampler import SWEEP_FILE, SWEEP_PLOT
from .schedulers.samplers import (
    EVAL_SAMPLER,
    EVAL_STEPS,
    SAMPLERS,
    SWEEP_SAMPLERS,
    SWEEP_STEPS,
    check_num_steps,
    get_sampler,
)
from .utils.atomic_files import atomic_write, write_json_atomically
from .visualization import DenoisingRecorder, forward_process_strip, make_grid, to_pil

OTHER_SAMPLERS_STEPS = 50  # default --steps for a --scheduler other than ddpm
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_sample_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate images from a saved pipeline: a grid or a folder of PNGs, and the denoising pictures",
        description="Generate --num-images images. Image i starts from the noise of seed + i, so the images do not "
                    "depend on --batch-size. With --gif or --strip, the first batch's denoising is drawn too.",
    )
    _add_model_arguments(parser)
    _add_sampler_arguments(parser)
    parser.add_argument("--num-images", type=int, default=16, metavar="N", help="how many images (default: 16)")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), metavar="DIR_OR_GRID",
                        help="a .png/.jpg/.webp file: one grid of all images; anything else: a folder of 00000.png, "
                        "00001.png, ... (default: samples.png)")
    parser.add_argument("--gif", type=Path, metavar="PATH", help="also save the denoising process as an animated GIF")
    parser.add_argument("--strip", type=Path, metavar="PATH", help="also save the denoising process as a strip of "
                        "snapshots (a row per image, a column per timestep)")
    parser.add_argument("--strip-timesteps", type=_int_list, default=[999, 800, 600, 400, 200, 100, 50, 0],
                        metavar="T,T,...", help="the timesteps of the strip's columns; the nearest steps of the "
                        "schedule are taken (default: 999,800,600,400,200,100,50,0)")
    parser.set_defaults(run=run_sample)


def run_sample(args: argparse.Namespace) -> None:
    pipe = _load_for_sampling(args)
    gif = DenoisingRecorder() if args.gif else None
    strip = DenoisingRecorder(timesteps=args.strip_timesteps) if args.strip else None
    recorders = [recorder for recorder in (gif, strip) if recorder is not None]

    def record(pipe, step_index, timestep, state):
        for recorder in recorders:
            recorder(pipe, step_index, timestep, state)

    images = generate_images(pipe, args.num_images, batch_size=args.batch_size, num_inference_steps=args.steps,
                             seed=args.seed, first_batch_callback=record if recorders else None, show_progress=True)
    if args.out.suffix.lower() in GRID_SUFFIXES:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images).save(args.out)
        print(f"Wrote a grid of {len(images)} images to {args.out}.")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(to_pil(images)):
            image.save(args.out / f"{index:05d}.png")
        print(f"Wrote {len(images)} images to {args.out}/.")
    if gif is not None:
        gif.save_gif(args.gif)
        print(f"Wrote the denoising animation ({len(gif.snapshots)} frames) to {args.gif}.")
    if strip is not None:
        strip.strip().save(args.strip)
        print(f"Wrote the denoising strip ({len(strip.snapshots)} timesteps) to {args.strip}.")


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure sample quality: Fréchet distance (FID), KID, precision/recall against a reference set",
        description="Generate --num-samples images and compare their features with a reference set's. The reference "
                    "statistics are cached (see --cache-dir). With the embedded digits, the digits classifier's "
                    "features work offline and also give its confidence and class coverage; FID proper needs the "
                    f"Inception weights file (--inception-weights or {INCEPTION_WEIGHTS_ENV}), never downloaded.",
    )
    _add_model_arguments(parser)
    _add_sampler_arguments(parser, default_scheduler=EVAL_SAMPLER)
    _add_reference_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=360, metavar="N", help="images to generate; compare only "
                        "numbers from the same count (default: 360, the size of the digits' test split)")
    parser.add_argument("--output", type=Path, metavar="FILE.json", help="also write the metrics as JSON")
    parser.set_defaults(run=run_evaluate)


def _add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference set and features, shared by `evaluate` and `sweep`."""
    parser.add_argument("--reference", default="digits", help='"digits" (the embedded digits), a Hub dataset id or '
                        "a local image folder (default: digits)")
    parser.add_argument("--split", default="train", help="the reference's split; the digits have train (1,437), test "
                        "(360) and all (default: train)")
    parser.add_argument("--dataset-config", help="the Hub dataset's configuration, when it has several")
    parser.add_argument("--image-column", help='the reference column of images (default: "image", "img" or the '
                        "only one)")
    parser.add_argument("--max-reference-images", type=int, metavar="N", help="use a fixed random subset of the "
                        "reference")
    parser.add_argument("--features", choices=FEATURE_EXTRACTORS, help="the feature extractor (default: digits for "
                        "the digits reference, else inception)")
    parser.add_argument("--inception-weights", type=Path, metavar="PATH", help="the TorchScript file "
                        "inception-2015-12-05.pt, for --features inception")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", help="where reference statistics are cached "
                        "(default: $HF_HOME/ddpm_hf/reference_stats)")


def _reference_kwargs(args: argparse.Namespace) -> dict:
    """The reference arguments of `evaluate_pipeline` and `sweep_samplers`."""
    return dict(reference=args.reference, split=args.split,
                features=args.features or ("digits" if args.reference == "digits" else "inception"),
                inception_weights=args.inception_weights, dataset_config_name=args.dataset_config,
                image_column=args.image_column, max_reference_images=args.max_reference_images,
                cache_dir=args.cache_dir)


def run_evaluate(args: argparse.Namespace) -> None:
    pipe = _load_for_sampling(args)
    with _plain_warnings():
        result = evaluate_pipeline(
            pipe, args.num_samples, num_inference_steps=args.steps, sample_batch_size=args.batch_size, seed=args.seed,
            show_progress=True, floor_split=default_floor_split(args.reference, args.split), **_reference_kwargs(args),
        )
    print(f"{args.model}: {result.num_samples} samples ({args.scheduler}, {args.steps} steps, seed {args.seed}) vs "
          f"{result.reference} ({result.num_reference} images), features {result.features}")
    print(f"  {format_quality(result)}")
    for name, value in result.metrics().items():
        print(f"  {name:<17} {value:.4f}")
    if args.output:
        record = {"model": args.model, "scheduler": args.scheduler, "steps": args.steps, "seed": args.seed,
                  **result.to_dict()}
        write_json_atomically(args.output, record)
        print(f"Wrote {args.output}.")


def add_sweep_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="find the fastest sampler of full quality: score every (sampler, steps) pair, plot the curve",
        description="Sample --num-samples images with every (sampler, steps) pair, image i from the noise of seed + i "
                    "in every pair, and score each against the reference (as `evaluate` does). Writes "
                    f"DIR/{SWEEP_FILE} and DIR/{SWEEP_PLOT} (distance against model calls; needs matplotlib: pip "
                    "install ddpm_hf[plots]). Recommends the pair with the fewest model calls whose distance is "
                    "within --tolerance of the best one; --save stores it in the pipeline folder for "
                    "`sample --fast`, `evaluate --fast` and DDPMPipeline.use_fast_sampler().",
    )
    _add_model_arguments(parser)
    parser.add_argument("--samplers", type=_name_list, default=list(SWEEP_SAMPLERS), metavar="NAME,...",
                        help=f"the samplers, from {', '.join(SAMPLERS)} (default: {','.join(SWEEP_SAMPLERS)})")
    parser.add_argument("--steps", type=_int_list, metavar="N,...", help="the step counts, each tried with every "
                        f"sampler (default: {','.join(map(str, SWEEP_STEPS))} and the model's num_train_timesteps, "
                        "1000 for the paper's schedule)")
    parser.add_argument("--num-samples", type=int, default=360, metavar="N", help="images per pair (default: 360)")
    _add_reference_arguments(parser)
    parser.add_argument("--floor-split", default="test", metavar="SPLIT", help="held-out real images of the "
                        "reference, scored like samples: the real-data floor, whose standard deviation is "
                        "the default tolerance (default: test; none: no floor, give --tolerance)")
    parser.add_argument("--tolerance", type=float, metavar="D", help="recommend the cheapest pair within D of the "
                        "best distance (default: the floor's standard deviation)")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help=f"where {SWEEP_FILE} and {SWEEP_PLOT} go (default: the current folder)")
    parser.add_argument("--save", action="store_true", help="store the recommendation in MODEL (a local folder) as "
                        "scheduler/fast_scheduler_config.json, which diffusers ignores, with the curve, and rewrite "
                        "its model card; the weights are never touched")
    parser.set_defaults(run=run_sweep)


def run_sweep(args: argparse.Namespace) -> None:
    folder = Path(args.model).expanduser()
    if args.save and not folder.is_dir():
        raise ValueError(f"--save writes the recommendation into the pipeline folder, but {args.model} is not a local "
                         f"folder: download it first (`hf download {args.model} --local-dir DIR`), then sweep DIR.")
    _check_positive(args, ("num_samples", "batch_size"))
    for name in args.samplers:
        get_sampler(name)
    if not CAN_PLOT:
        print(f"warning: matplotlib is not installed, so there will be no {SWEEP_PLOT}: pip install ddpm_hf[plots]",
              file=sys.stderr)
    pipe = load_pipeline(args.model, args.device)
    floor_split = None if args.floor_split.lower() == "none" else args.floor_split
    with _plain_warnings():
        sweep = sweep_samplers(pipe, args.samplers, args.steps, args.num_samples, batch_size=args.batch_size,
                               seed=args.seed, floor_split=floor_split, tolerance=args.tolerance, show_progress=True,
                               **_reference_kwargs(args))
    print(sweep.report())
    write_json_atomically(args.out / SWEEP_FILE, sweep.to_dict())
    written = [args.out / SWEEP_FILE]
    if CAN_PLOT:
        written.append(plot_sweep(sweep, args.out / SWEEP_PLOT, title=f"{args.model}: samplers on {args.num_samples} "
                                                                        "samples"))
    print(f"Wrote {', '.join(map(str, written))}.")
    if args.save:
        save_recommendation(folder, sweep, pipe, written)


def save_recommendation(folder: Path, sweep: SamplerSweep, pipe: DDPMPipeline, written: list[Path]) -> None:
    """Store the sweep's recommendation in the pipeline folder (the fast scheduler config, the sweep's JSON and plot)
    and rewrite its model card if ddpm_hf wrote it; never the weights or diffusers' own configs."""
    for path in written:
        target = folder / path.name
        if path.resolve() != target.resolve():
            with atomic_write(target) as temporary:
                shutil.copyfile(path, temporary)
    fast_sampler = sweep.fast_sampler(pipe)
    path = fast_sampler.save(folder)
    print(f"Saved the recommendation ({fast_sampler.sampler}, {fast_sampler.num_inference_steps} steps) to {path}. "
          f"Use it with `ddpm-hf sample {folder} --fast` or "
          f"`DDPMPipeline.from_pretrained({str(folder)!r}).use_fast_sampler()`.")
    card = folder / CARD_NAME
    if not card.exists() or is_generated_card(card):
        print(f"Rewrote the model card {write_model_card(folder)}.")


def add_noise_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "noise",
        help="draw the forward (noising) process of an image as a strip",
        description="Noise IMAGE with the model's scheduler, q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, "
                    "(1 - alpha_bar_t) I), at --timesteps, with the same noise in every column.",
    )
    parser.add_argument("model", metavar="MODEL", help="a saved pipeline folder or a Hub repo id (for its scheduler)")
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the image to noise")
    parser.add_argument("--timesteps", type=_int_list, metavar="T,T,...", help="the columns (default: 0, 5%%, 10%%, "
                        "20%%, 30%%, 50%%, 70%% and 100%% of T: 0,50,100,200,300,500,700,999 for T = 1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the noise (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("noising.png"), metavar="PNG",
                        help="the strip (default: noising.png)")
    parser.set_defaults(run=run_noise)


def run_noise(args: argparse.Namespace) -> None:
    try:
        with Image.open(args.image) as image:
            image.load()
    except (OSError, ValueError) as error:  # missing, unreadable, not an image
        raise ValueError(f"Cannot read the image {args.image}: {error}") from error
    pipe = load_pipeline(args.model)
    forward_process_strip(image, pipe.scheduler, args.timesteps, args.seed).save(args.out)
    print(f"Wrote the noising strip to {args.out}.")


def load_pipeline(model: str, device: str | torch.device = "cpu") -> DDPMPipeline:
    """A saved pipeline from a local folder or a Hub repo id; a `ValueError` that says why when it is neither."""
    path = Path(model).expanduser()
    if path.is_file():
        raise ValueError(f"{model} is a file: pass the folder that holds model_index.json (a training run's "
                         "--output_dir), or a Hub repo id.")
    try:
        pipe = DDPMPipeline.from_pretrained(path if path.is_dir() else model)
    except (OSError, ValueError) as error:
        if path.is_dir():
            raise ValueError(str(error)) from error
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{model} is neither a local folder nor a loadable Hub repo ({type(error).__name__}: "
                         f"{reason}). Offline, a Hub repo loads from the cache with HF_HUB_OFFLINE=1.") from error
    return pipe.to(device)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and sampling arguments shared by `sample`, `evaluate` and `sweep`."""
    parser.add_argument("model", metavar="MODEL", help="a saved pipeline folder (a training run's --output_dir) or a "
                        "Hub repo id")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="images generated at a time (default: 64)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="image i starts from the noise of seed + i (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the model (default: cuda if available, else cpu)")


def _add_sampler_arguments(parser: argparse.ArgumentParser, default_scheduler: str = "ddpm") -> None:
    """The sampler arguments shared by `sample` and `evaluate`."""
    parser.add_argument("--scheduler", choices=SAMPLERS, help="the sampler; all of them work with a model trained as "
                        f"a DDPM (default: {default_scheduler})")
    steps = (f"{EVAL_STEPS} for the default {EVAL_SAMPLER}, " if default_scheduler == EVAL_SAMPLER else "")
    parser.add_argument("--steps", type=int, metavar="N", help=f"denoising steps (default: {steps}the model's "
                        f"num_train_timesteps for ddpm, {OTHER_SAMPLERS_STEPS} for the others)")
    parser.add_argument("--fast", action="store_true", help="the sampler and steps that `ddpm-hf sweep MODEL --save` "
                        "measured and saved for this model")
    parser.set_defaults(default_scheduler=default_scheduler)


def _load_for_sampling(args: argparse.Namespace) -> DDPMPipeline:
    """The pipeline with the --scheduler asked for (or the saved one, with --fast); fills in the default --steps."""
    _check_positive(args, ("num_images", "num_samples", "batch_size", "steps"))
    if args.fast and (args.scheduler is not None or args.steps is not None):
        raise ValueError("--fast samples with the saved sampler and steps: leave out --scheduler and --steps, or "
                         "leave out --fast.")
    pipe = load_pipeline(args.model, args.device)
    if args.fast:
        pipe.use_fast_sampler()
        args.scheduler, args.steps = pipe.fast_sampler.sampler, pipe.fast_sampler.num_inference_steps
        return pipe
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    chosen, args.scheduler = args.scheduler, args.scheduler or args.default_scheduler
    if args.steps is None:
        if args.scheduler == "ddpm":
            args.steps = num_train_timesteps
        else:  # the default sampler at the steps it was validated with (see EVAL_STEPS)
            args.steps = EVAL_STEPS if chosen is None else OTHER_SAMPLERS_STEPS
    check_num_steps(args.steps, num_train_timesteps)
    pipe.scheduler = SAMPLERS[args.scheduler].make_scheduler(pipe.scheduler.config)
    return pipe


def _check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@contextmanager
def _plain_warnings() -> Iterator[None]:
    """Print warnings as one line ("warning: ...") instead of Python's file:line format."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        yield
