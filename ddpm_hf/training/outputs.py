"""What a run leaves behind: sample grids, the denoising GIF and the saved pipeline (`ddpm_hf.hub` uploads it)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ..pipelines import DDPMPipeline
from .checkpointing import replace

FINAL_GRID = "samples.png"
DENOISING_GIF = "denoising.gif"
RAW_UNET_DIR = "unet_raw"
RUN_RECORD = "training_config.json"  # the config and facts about the run, read by ddpm_hf.hub's model card
_GRID_WIDTH = 256  # small images are enlarged (nearest neighbour) until the grid is about this wide
_GIF_FRAMES = 40


def image_grid(images: list[Image.Image]) -> Image.Image:
    """The images in the squarest grid that holds them exactly, enlarged so that small images stay visible."""
    rows = max(d for d in range(1, math.isqrt(len(images)) + 1) if len(images) % d == 0)
    cols = len(images) // rows
    width, height = images[0].size
    scale = max(1, _GRID_WIDTH // (cols * width))
    images = [image.resize((width * scale, height * scale), Image.Resampling.NEAREST) for image in images]
    return make_image_grid(images, rows=rows, cols=cols)


def sample_grid(
    pipeline: DDPMPipeline, num_images: int, num_inference_steps: int, seed: int, gif_path: Path | None = None
) -> Image.Image:
    """Sample `num_images` from the noise that `seed` fixes (the same at every call, so grids compare across
    steps) as one grid; with `gif_path`, also save the denoising process as an animated GIF."""
    frames: list[Image.Image] = []
    every = max(1, num_inference_steps // _GIF_FRAMES)

    def record_frame(pipe: DDPMPipeline, step_index: int, timestep: torch.Tensor, state: dict) -> None:
        if (step_index + 1) % every == 0 or step_index + 1 == num_inference_steps:
            frames.append(image_grid(pipe.postprocess(state["sample"], "pil")))

    generator = torch.Generator(pipeline.device).manual_seed(seed)
    images = pipeline(
        batch_size=num_images,
        generator=generator,
        num_inference_steps=num_inference_steps,
        output_type="pil",
        callback_on_step_end=record_frame if gif_path is not None else None,
    ).images
    grid = image_grid(images)
    if gif_path is not None:
        # 80 ms a frame, and the finished grid (the last frame) held for two seconds before the loop restarts.
        durations = [80] * (len(frames) - 1) + [2000]
        frames[0].save(gif_path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return grid


def publish(staging: Path, output_dir: Path):
    """Move everything in `staging` into `output_dir`, replacing what is there, with model_index.json last.

    The old model_index.json goes first, so at no moment does output_dir hold a loadable but
    half-replaced pipeline.
    """
    (output_dir / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == "model_index.json"):
        replace(entry, output_dir / entry.name)
    staging.rmdir()
