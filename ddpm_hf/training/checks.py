"""Checks of a run's inputs, each failing with a message that says what to change, before compute is spent."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from .config import TrainingConfig
from ..data import TrainData
from .checkpointing import CHECKPOINTS_DIR
from .durable_io import format_bytes
from .presets import downsampling_factor
from .run_lock import LOCK_FILE

logger = get_logger(__name__)


class LaunchError(RuntimeError):
    """The launcher started processes that do not form one distributed run."""


def check_launch(accelerator: Accelerator):
    """Refuse what this launch cannot do: fp16 without a GPU, or processes that would each train alone (the
    launcher's WORLD_SIZE against Accelerate's count)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU (its loss scaling is CUDA-only); on a CPU use bf16 or no.")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"The launcher started {launched} processes, but each one sees only itself "
            f"(Accelerate counts {accelerator.num_processes}): they would all train the same model and overwrite "
            "each other's files. Without GPUs, launch CPU processes with "
            f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} examples/train.py ...`; "
            "with GPUs, check that CUDA sees them (nvidia-smi, CUDA_VISIBLE_DEVICES)."
        )


def check_resolution(unet_config: dict, config: TrainingConfig):
    """The UNet halves the image at each down block but the last, so the resolution must divide evenly."""
    factor = downsampling_factor(unet_config)
    resolution = config.data.resolution
    if resolution % factor:
        lower, higher = resolution // factor * factor, (resolution // factor + 1) * factor
        raise ValueError(
            f"--resolution {resolution} is not divisible by {factor}, the downsampling factor of --model_config "
            f"{config.model_config} (it halves the image {factor.bit_length() - 1} times). "
            f"Use --resolution {lower or higher} or {higher}."
        )
    fixed = unet_config.get("sample_size")
    if fixed is not None and fixed != resolution:
        raise ValueError(
            f"--model_config {config.model_config} fixes sample_size={fixed}, but --resolution is {resolution}. "
            f"Pass --resolution {fixed}, or remove sample_size from the config to follow --resolution."
        )


def check_output_dir(config: TrainingConfig):
    """A non-empty output_dir is only written into when asked to, or when resuming the run saved there (a lock
    file alone does not count: the run holding it, if alive, is named when locking)."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file.")
    if output_dir.is_dir() and any(path.name != LOCK_FILE for path in output_dir.iterdir()):
        if not (config.overwrite_output_dir or config.resume_from_checkpoint):
            raise FileExistsError(
                f"--output_dir {output_dir} is not empty. Pass --resume_from_checkpoint latest to continue the run "
                "saved there, --overwrite_output_dir to write into it anyway, or choose another --output_dir."
            )


def fit_to_data(unet_config: dict, num_channels: int, config: TrainingConfig) -> dict:
    """The UNet config with channels and sample size from the data; a config that fixes them must agree. A model with
    learned variances predicts them in as many extra output channels."""
    out_channels = 2 * num_channels if config.variance_type == "learned_range" else num_channels
    for key, channels in (("in_channels", num_channels), ("out_channels", out_channels)):
        fixed = unet_config.get(key)
        if fixed is not None and fixed != channels:
            learned = " (twice the images' channels: --variance_type learned_range)" if key == "out_channels" and (
                channels != num_channels) else ""
            raise ValueError(
                f"--model_config {config.model_config} fixes {key}={fixed}, but the training images have "
                f"{num_channels} channel(s), so it must be {channels}{learned}. Pass --num_channels {fixed} to "
                f"convert the images, or remove {key} from the config to follow the data."
            )
    return {**unet_config, "in_channels": num_channels, "out_channels": out_channels,
            "sample_size": config.data.resolution}


def count_train_steps(config: TrainingConfig, data: TrainData, num_processes: int) -> int:
    """Optimizer steps to take: --max_train_steps, or --num_epochs passes over the data."""
    if data.num_examples is not None and data.num_examples // num_processes < config.train_batch_size:
        raise ValueError(
            f"{data.name} has {data.num_examples} images: fewer than one batch of {config.train_batch_size} for "
            f"each of {num_processes} process(es). Lower --train_batch_size."
        )
    if config.num_epochs is None:
        return config.max_train_steps
    if data.num_examples is None:
        raise ValueError("--num_epochs needs a dataset of known size; with --streaming use --max_train_steps.")
    batches_per_epoch = data.num_examples // num_processes // config.train_batch_size
    return math.ceil(config.num_epochs * batches_per_epoch / config.gradient_accumulation_steps)


def check_disk_space(config: TrainingConfig, checkpoint_bytes: int, pipeline_bytes: int):
    """Warn when output_dir's disk cannot hold the checkpoints kept (plus the one being written) and the pipeline
    (plus its staged copy), estimated from the model's size: the run would stop at its first save that does not fit."""
    output_dir = Path(config.output_dir)
    kept = config.checkpoints_total_limit or math.ceil(config.max_train_steps / config.checkpointing_steps)
    existing = sum(path.stat().st_size for path in (output_dir / CHECKPOINTS_DIR).rglob("*") if path.is_file())
    needed = max(checkpoint_bytes * (kept + 1) - existing, checkpoint_bytes) + 2 * pipeline_bytes
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        logger.warning(
            f"--output_dir {output_dir} has {format_bytes(free)} free, but this run writes about "
            f"{format_bytes(needed)} (a checkpoint takes about {format_bytes(checkpoint_bytes)}, the pipeline "
            f"{format_bytes(pipeline_bytes)}): "
            "it may stop with an error at the first save that does not fit. Free some space, lower "
            "--checkpoints_total_limit, or choose another --output_dir."
        )
