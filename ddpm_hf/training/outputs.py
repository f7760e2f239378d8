"""What a run leaves behind: sample grids, the denoising GIF and the saved pipeline (`ddpm_hf.hub` uploads it)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..pipelines import DDPMPipeline
from ..visualization import DenoisingRecorder, make_grid
from .checkpointing import replace

FINAL_GRID = "samples.png"
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


def publish(staging: Path, output_dir: Path):
    """Move everything in `staging` into `output_dir`, replacing what is there, with model_index.json last.

    The old model_index.json goes first, so at no moment does output_dir hold a loadable but
    half-replaced pipeline.
    """
    (output_dir / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == "model_index.json"):
        replace(entry, output_dir / entry.name)
    staging.rmdir()
