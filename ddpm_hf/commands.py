"""The `sample`, `evaluate` and `noise` subcommands of `ddpm-hf`.

    ddpm-hf sample MODEL [--num-images N] [--batch-size B] [--steps S] [--scheduler ddim] [--seed X]
                         [--out DIR_OR_GRID.png] [--gif PATH] [--strip PATH]
    ddpm-hf evaluate MODEL [--reference digits|HUB_ID|FOLDER] [--split SPLIT] [--features digits|inception]
                           [--num-samples N] [--steps S] [--scheduler ddim] [--output metrics.json]
    ddpm-hf noise MODEL IMAGE [--timesteps 0,100,...] [--out noising.png]

MODEL is a folder written by `save_pretrained` (a training run's --output_dir) or a Hub repo id.
Each `add_<name>_command(subparsers)` declares its arguments and sets `run` to the function that runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import diffusers
import torch
from PIL import Image

from .evaluation import evaluate_pipeline, generate_images
from .evaluation.features import FEATURE_EXTRACTORS, INCEPTION_WEIGHTS_ENV
from .pipelines import DDPMPipeline
from .schedulers import DDPMScheduler
from .visualization import DenoisingRecorder, forward_process_strip, make_grid, to_pil

# --scheduler names: any of these can sample from a model trained with the DDPM scheduler.
SCHEDULERS = {
    "ddpm": DDPMScheduler,  # ancestral sampling, Ho et al. 2020: needs ~1000 steps
    "ddim": diffusers.DDIMScheduler,  # Song et al. 2021, deterministic: 50-100 steps
    "pndm": diffusers.PNDMScheduler,
    "dpm-solver": diffusers.DPMSolverMultistepScheduler,  # Lu et al. 2022: 20-25 steps
    "euler": diffusers.EulerDiscreteScheduler,
    "euler-ancestral": diffusers.EulerAncestralDiscreteScheduler,
}
FAST_STEPS = 50  # default --steps for every scheduler but ddpm
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_sample_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate images from a saved pipeline: a grid or a folder of PNGs, and the denoising pictures",
        description="Generate --num-images images. Image i starts from the noise of seed + i, so the images do not "
                    "depend on --batch-size. With --gif or --strip, the first batch's denoising is drawn too.",
    )
    _add_model_arguments(parser)
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
    parser.add_argument("--num-samples", type=int, default=360, metavar="N", help="images to generate; compare only "
                        "numbers from the same count (default: 360, the size of the digits' test split)")
    parser.add_argument("--output", type=Path, metavar="FILE.json", help="also write the metrics as JSON")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", help="where reference statistics are cached "
                        "(default: $HF_HOME/ddpm_hf/reference_stats)")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    pipe = _load_for_sampling(args)
    features = args.features or ("digits" if args.reference == "digits" else "inception")
    with _plain_warnings():
        result = evaluate_pipeline(
            pipe, args.num_samples, num_inference_steps=args.steps, sample_batch_size=args.batch_size, seed=args.seed,
            show_progress=True, reference=args.reference, split=args.split, features=features,
            inception_weights=args.inception_weights, dataset_config_name=args.dataset_config,
            image_column=args.image_column, max_reference_images=args.max_reference_images, cache_dir=args.cache_dir,
        )
    print(f"{args.model}: {result.num_samples} samples ({args.scheduler}, {args.steps} steps, seed {args.seed}) vs "
          f"{result.reference} ({result.num_reference} images), features {result.features}")
    for name, value in result.metrics().items():
        print(f"  {name:<17} {value:.4f}")
    if args.output:
        record = {"model": args.model, "scheduler": args.scheduler, "steps": args.steps, "seed": args.seed,
                  **result.to_dict()}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"Wrote {args.output}.")


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
    """The model and sampling arguments shared by `sample` and `evaluate`."""
    parser.add_argument("model", metavar="MODEL", help="a saved pipeline folder (a training run's --output_dir) or a "
                        "Hub repo id")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="images generated at a time (default: 64)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm", help="the sampler; all of them work with a "
                        "model trained as a DDPM (default: ddpm)")
    parser.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the scheduler's "
                        f"num_train_timesteps for ddpm, {FAST_STEPS} for the others)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="image i starts from the noise of seed + i (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the model (default: cuda if available, else cpu)")


def _load_for_sampling(args: argparse.Namespace) -> DDPMPipeline:
    """The pipeline with the --scheduler asked for; fills in the default --steps."""
    for name in ("num_images", "num_samples", "batch_size", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    pipe = load_pipeline(args.model, args.device)
    pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    if args.steps is None:
        args.steps = pipe.scheduler.config.num_train_timesteps if args.scheduler == "ddpm" else FAST_STEPS
    return pipe


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


@contextmanager
def _plain_warnings() -> Iterator[None]:
    """Print warnings as one line ("warning: ...") instead of Python's file:line format."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        yield
