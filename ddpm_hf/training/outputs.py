"""What a run leaves behind: sample grids, the denoising GIF and the saved pipeline (`ddpm_hf.hub` uploads it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..pipelines import DDPMPipeline
from ..utils.atomic_files import atomic_write
from ..visualization import DenoisingRecorder, make_grid
from .checkpointing import weights_bytes
from .durable_io import fsync, fsync_tree, replace

FINAL_GRID = "samples.png"
SAMPLES_DIR = "samples"  # the grids sampled during training
DENOISING_GIF = "denoising.gif"
RAW_UNET_DIR = "unet_raw"
RUN_RECORD = "training_config.json"  # the config and facts about the run, read by ddpm_hf.hub's model card
_GIF_FRAMES = 40  # snapshots of the denoising process in the GIF


def sample_grid(
    pipeline: DDPMPipeline, num_images: int, num_inference_steps: int, seed: int, gif_path: Path | None = None
) -> Image.Image:
    """Sample `num_images` from the noise that `seed` fixes (the same at every call, so grids compare across
    steps) as one grid; with `gif_path`, also save the denoising process as an animated GIF."""
    recorder = DenoisingRecorder(num_frames=_GIF_FRAMES) if gif_path is not None else None
    images = pipeline(
        batch_size=num_images,
        generator=torch.Generator(pipeline.device).manual_seed(seed),
        num_inference_steps=num_inference_steps,
        output_type="pil",
        callback_on_step_end=recorder,
    ).images
    if recorder is not None:
        recorder.save_gif(gif_path)
    return make_grid(images)


def save_image(image: Image.Image, path: Path):
    """Save `image` as `path` through a temporary file, so that a crash never leaves half a PNG."""
    with atomic_write(path) as temporary:
        image.save(temporary, format=path.suffix.lstrip(".").upper())


def publish(staging: Path, output_dir: Path):
    """Move everything in `staging` into `output_dir` durably, replacing what is there, with model_index.json last.

    The staged files are fsynced first; the old model_index.json goes first, so at no moment does
    output_dir hold a loadable but half-replaced pipeline (see `finished_step`).
    """
    fsync_tree(staging)
    (output_dir / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == "model_index.json"):
        replace(entry, output_dir / entry.name)
    staging.rmdir()
    fsync(output_dir)


def finished_step(output_dir: Path) -> int | None:
    """The step at which the pipeline in `output_dir` was saved, or None when there is no complete one."""
    if not (output_dir / "model_index.json").is_file():
        return None
    try:
        return int(json.loads((output_dir / RUN_RECORD).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pipeline_bytes(unet: torch.nn.Module, with_raw_weights: bool) -> int:
    """About how many bytes the saved pipeline takes: the EMA weights, the raw ones beside them, the grids."""
    return weights_bytes(unet) * (1 + with_raw_weights) + 256 * 1024  # + configs, card, sample grid
