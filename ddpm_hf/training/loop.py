"""The training loop: config -> checks -> data -> model -> optimizer steps -> saved pipeline.

Every step's noise and timesteps come from a generator seeded by (seed, step, micro-step, process),
and the data order and augmentation by (seed, epoch, index), so a run resumed from a checkpoint
takes exactly the steps an uninterrupted one would.

Example:

```py
>>> from ddpm_hf.training import TrainingConfig, train
>>> pipeline = train(TrainingConfig(max_train_steps=200, output_dir="ddpm-digits"))  # the embedded digits
>>> images = pipeline(batch_size=4).images
```
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, is_wandb_available, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from tqdm.auto import tqdm

from ..evaluation import (
    INCEPTION_WEIGHTS_ENV,
    FeatureExtractor,
    RealDataFloor,
    ReferenceStats,
    default_floor_split,
    format_quality,
    generate_images,
    prepare_scoring,
    reference_for_training,
)
from ..evaluation.evaluate import compare
from ..hub import EVAL_RESULTS_FILE, HubPushError, create_hub_repo, push_to_hub, write_model_card
from ..models import UNet2DModel
from ..pipelines import DDPMPipeline
from ..schedulers import DDPMScheduler
from ..schedulers.samplers import get_sampler
from .agreement import all_or_none, decided_by_main
from .budget import fit_to_budget, past_deadline
from .checkpointing import (Progress, checkpoint_bytes, checkpoint_progress, find_checkpoint, list_checkpoints,
                            load_checkpoint, save_checkpoint, weights_sha256)
from .checks import check_disk_space, check_launch, check_output_dir, check_resolution, count_train_steps, fit_to_data
from .config import TrainingConfig
from ..data import TrainData, load_train_data
from .losses import training_loss
from .monitoring import LossMonitor, NonFiniteLossError, Throughput, stop_agreed, stop_signals
from .durable_io import write_failure, write_text
from .outputs import (DENOISING_GIF, FINAL_GRID, RAW_UNET_DIR, RUN_RECORD, SAMPLES_DIR, finished_step, pipeline_bytes,
                      publish, sample_grid, save_image)
from .presets import load_unet_config
from .run_lock import lock_output_dir
from .teardown import end_training

logger = get_logger(__name__)


# What sample quality is measured against: the features, the training data's statistics, the real-data floor.
QualityReference = tuple[FeatureExtractor, ReferenceStats, RealDataFloor | None]


@dataclass
class Run:
    """Everything the loop works on, made by `build`."""

    config: TrainingConfig
    accelerator: Accelerator
    model: torch.nn.Module  # the UNet as Accelerate prepared it (DDP-wrapped, autocast, maybe compiled)
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    data: TrainData
    dataloader: DataLoader
    max_train_steps: int
    progress: Progress = field(default_factory=Progress)
    repo_id: str | None = None  # the Hub repo to push to (main process, --push_to_hub), created before training
    quality_reference: QualityReference | None = None  # main process, when sample quality is measured
    evaluation: dict | None = None  # the latest sample-quality record, saved as eval_results.json for the card
    deadline: float | None = None  # with --max_train_minutes: the `time.perf_counter()` at which training stops

    @property
    def unet(self) -> UNet2DModel:
        """The bare UNet inside `model` (not compiled: sampling other batch sizes recompiles nothing)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format


def train(config: TrainingConfig) -> DDPMPipeline | None:
    """Train a DDPM as `config` says and save it in `config.output_dir`.

    Bad input (flags, data, output folder, checkpoint path) raises `ValueError` or `OSError` before any
    compute is spent, and so does an output_dir that another live run holds (`OutputDirLockedError`).
    SIGTERM/SIGINT save a checkpoint at the next step and return None; a NaN/inf loss raises
    [`NonFiniteLossError`]; a checkpoint or pipeline that cannot be written raises `WriteFailedError`
    (nothing saved before is lost). Resuming a finished run ("latest") trains and writes nothing.

    Returns:
        The [`DDPMPipeline`] with the EMA weights (on every process), or None if stopped by a signal.
    """
    started = time.perf_counter()  # --max_train_minutes counts from here
    if config.dry_run:
        print(json.dumps(config.resolved(), indent=2))
        return None
    accelerator = make_accelerator(config)
    lock = None
    try:
        unet_config = load_unet_config(config.model_config)
        check_resolution(unet_config, config)
        check_output_dir(config)
        lock = lock_output_dir(accelerator, config.output_dir)
        checkpoint = decided_by_main(accelerator, lambda: find_checkpoint(config.output_dir,
                                                                          config.resume_from_checkpoint))
        repo_id = None
        if config.push_to_hub and accelerator.is_main_process:  # a missing token or login fails here, not at the end
            repo_id = create_hub_repo(config.hub_model_id or Path(config.output_dir).name,
                                      private=config.hub_private_repo, token=config.hub_token)
        data = load_train_data(
            config.data,
            seed=config.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
        unet_config = fit_to_data(unet_config, data.num_channels, config)
        max_train_steps = count_train_steps(config, data, accelerator.num_processes)
        if checkpoint is not None and config.max_train_minutes is not None:
            # The length the time budget gave the run when it started: the LR schedule spans it again.
            max_train_steps = checkpoint_progress(checkpoint).total_steps or max_train_steps
        saved_at = finished_step(Path(config.output_dir))
        if config.resume_from_checkpoint == "latest" and saved_at is not None and saved_at >= max_train_steps:
            return finished_run(config, repo_id, saved_at, max_train_steps)
        quality_reference = None
        if (config.eval_every is not None or config.eval_at_end) and accelerator.is_main_process:
            quality_reference = prepare_quality_reference(config, data, accelerator.device)  # no Inception file: here
        accelerator.wait_for_everyone()  # every process has passed the checks before any of them writes

        run = build(config, accelerator, data, unet_config, max_train_steps)
        run.repo_id, run.quality_reference = repo_id, quality_reference
        if checkpoint is not None:
            resume(run, checkpoint)
        if config.max_train_minutes is not None:
            fit_to_budget(run, started)
        if accelerator.is_main_process:
            check_disk_space(config, checkpoint_bytes(run.unet, run.ema is not None),
                             pipeline_bytes(run.unet, run.ema is not None))
        start_logging(run)
        if train_loop(run) is not None:
            return None
        pipeline = save(run)
        push(config, run.repo_id, f"Trained for {run.progress.global_step} steps with ddpm_hf")
        return pipeline
    finally:
        if lock is not None:
            lock.release()
        run = None  # its DDP model holds the process group; end_training must see the last of it
        end_training(accelerator)


def finished_run(config: TrainingConfig, repo_id: str | None, step: int, max_train_steps: int) -> DDPMPipeline:
    """A run resumed after it finished: say so, finish an interrupted push, and return the saved pipeline."""
    logger.info(f"The run in {config.output_dir} is finished (step {step} of {max_train_steps}): nothing to train "
                "or save. Raise --max_train_steps to train longer.")
    push(config, repo_id, f"Trained for {step} steps with ddpm_hf")  # uploads only what is missing, if anything
    pipeline = DDPMPipeline.from_pretrained(config.output_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def prepare_quality_reference(config: TrainingConfig, data: TrainData, device: torch.device) -> QualityReference | None:
    """The feature extractor, the training data's feature statistics and (on the digits) the real-data floor that
    `--eval_every` and `--eval_at_end` compare samples with. None for `--eval_at_end` alone on data other than the
    digits without the Inception weights: that end-of-run measurement is skipped, not an error."""
    reference = reference_for_training(config.data)
    has_inception = config.eval_inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if config.eval_every is None and reference["features"] == "inception" and not has_inception:
        logger.info(f"Sample quality will not be measured at the end: on {data.name} it needs the Inception weights "
                    "(--eval_inception_weights).")
        return None
    floor_split = default_floor_split(reference["reference"], reference["split"])
    try:
        return prepare_scoring(data.num_channels, config.data.resolution, config.eval_num_samples, floor_split,
                               device=device, inception_weights=config.eval_inception_weights, **reference)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"--eval_every compares samples of {data.name} with it in Inception features (the FID): {error} "
            "In training, give the file with --eval_inception_weights PATH, or leave out --eval_every."
        ) from error


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The run's Accelerator; refuses a launch whose processes would each train alone."""
    if config.logger == "wandb" and not is_wandb_available():
        raise ImportError("--logger wandb needs the wandb package: `pip install wandb`, or use --logger tensorboard.")
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.logger == "none" else config.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The LR schedule counts optimizer steps; by default Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator)
    return accelerator


# Build


def build(config: TrainingConfig, accelerator: Accelerator, data: TrainData, unet_config: dict,
          max_train_steps: int) -> Run:
    """The UNet, noise scheduler, AdamW, LR schedule and EMA, prepared by Accelerate, and the dataloader."""
    set_seed(config.seed)  # the initial weights
    if config.allow_tf32:
        torch.set_float32_matmul_precision("high")
    unet = UNet2DModel(**unet_config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=config.ddpm_num_steps,
        beta_schedule=config.ddpm_beta_schedule,
        prediction_type=config.prediction_type,
        variance_type=config.variance_type,  # saved with the pipeline: how it samples
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        fused=accelerator.device.type == "cuda",
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_train_steps
    )
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    ema = None
    if config.use_ema:
        # Without warm-up, diffusers' EMAModel still ramps the decay as (1 + step) / (10 + step); a floor at the
        # decay itself gives the fixed decay of the DDPM paper's code (the first update copies the weights).
        ema = EMAModel(unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=config.ema_warmup,
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power, foreach=True,
                       min_decay=0.0 if config.ema_warmup else config.ema_max_decay)
    if config.torch_compile:
        model = compile_or_eager(model, unet_config, config)
    return Run(config, accelerator, model, noise_scheduler, optimizer, lr_scheduler, ema, data,
               make_dataloader(data, config, accelerator), max_train_steps)


def resume(run: Run, checkpoint: Path):
    """Load a checkpoint into the built run: weights, optimizer, LR schedule, EMA, RNG states and progress."""
    run.progress = load_checkpoint(run.accelerator, checkpoint, run.data.dataset, run.ema, parameter_names(run))
    if run.ema is not None:
        run.ema.to(run.accelerator.device)  # loaded onto the CPU
    logger.info(f"Resumed from {checkpoint} at step {run.progress.global_step}.")


def make_dataloader(data: TrainData, config: TrainingConfig, accelerator: Accelerator) -> DataLoader:
    """This process's batches. Map-style data is sharded and reshuffled each epoch by a DistributedSampler;
    a stream arrives sharded. Not passed to `accelerator.prepare`: the epoch and the position in it are
    ours to checkpoint (see `Progress`)."""
    sampler = None
    if not isinstance(data.dataset, IterableDataset):
        sampler = DistributedSampler(data.dataset, num_replicas=accelerator.num_processes,
                                     rank=accelerator.process_index, shuffle=True, seed=config.seed, drop_last=True)
    return DataLoader(
        data.dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        drop_last=True,  # equal, full batches on every process
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating an iterator would otherwise draw from the global RNG (which dropout uses)
        # at epoch starts, so a resumed run's dropout masks would drift from an uninterrupted run's.
        generator=torch.Generator().manual_seed(config.seed),
    )


def compile_or_eager(model: torch.nn.Module, unet_config: dict, config: TrainingConfig) -> torch.nn.Module:
    """`torch.compile(model)`, traced now with one forward and backward pass; the eager model if that fails."""
    size = config.data.resolution
    device = next(model.parameters()).device
    example = torch.zeros(config.train_batch_size, unet_config["in_channels"], size, size, device=device)
    example = example.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    timesteps = torch.zeros(config.train_batch_size, dtype=torch.long, device=device)
    try:
        compiled = torch.compile(model)
        compiled(example, timesteps).sample.float().mean().backward()
        return compiled
    except Exception as error:  # no C++ compiler, an unsupported Python or platform, a graph break that fails...
        logger.warning(f"--torch_compile: torch.compile failed ({type(error).__name__}: {error}); "
                       "training in eager mode.")
        return model
    finally:
        model.zero_grad(set_to_none=True)


def start_logging(run: Run):
    """Save the config beside the model (unless a pipeline is there: its record stays with it until the new one
    replaces both), start the trackers and describe the run."""
    config, accelerator, data = run.config, run.accelerator, run.data
    if accelerator.is_main_process and finished_step(Path(config.output_dir)) is None:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        write_run_record(run, Path(config.output_dir))
    accelerator.init_trackers("ddpm_hf", config=config.to_dict())
    num_parameters = sum(p.numel() for p in run.unet.parameters())
    global_batch = global_batch_size(run)
    logger.info(
        f"Training a {num_parameters / 1e6:.2f}M-parameter UNet ({config.model_config}) on {data.name} "
        f"({data.num_examples or 'a stream of'} images, {data.num_channels} channel(s), {config.data.resolution} px) "
        f"for {run.max_train_steps} steps of {global_batch} images ({accelerator.num_processes} process(es) x "
        f"{config.train_batch_size} x {config.gradient_accumulation_steps} accumulation), on {accelerator.device}, "
        f"mixed precision: {accelerator.mixed_precision}."
    )


def write_run_record(run: Run, folder: Path, finished: bool = False):
    """`training_config.json`: the config (never the token) and, once finished, facts for the model card."""
    record = run.config.to_dict()
    record["total_steps"] = run.max_train_steps  # the run's length (decided by calibration with --max_train_minutes)
    if run.data.skipped_images:
        record["skipped_images"] = run.data.skipped_images  # unreadable files left out (--skip_bad_images)
    if finished:
        accelerator = run.accelerator
        on_gpu = accelerator.device.type == "cuda"
        record.update(
            global_step=run.progress.global_step,
            num_processes=accelerator.num_processes,
            hardware=f"{accelerator.num_processes}x {torch.cuda.get_device_name(accelerator.device)}" if on_gpu
            else f"{os.cpu_count()} CPU cores",
            training_time_seconds=round(run.progress.training_seconds, 1),
            mixed_precision=accelerator.mixed_precision,
        )
    write_text(folder / RUN_RECORD, json.dumps(record, indent=2) + "\n")


# The loop


def train_loop(run: Run) -> str | None:
    """Take optimizer steps up to `max_train_steps`; returns the signal that stopped it early, if one did."""
    config, progress = run.config, run.progress
    batches = endless_batches(run.dataloader, progress)
    monitor = LossMonitor(run.accelerator.device)
    throughput = Throughput(global_batch_size(run), progress.global_step)
    bar = tqdm(total=run.max_train_steps, initial=progress.global_step, desc="Training", unit="step",
               disable=not run.accelerator.is_main_process)
    with stop_signals() as received, bar:
        clock = time.perf_counter()
        while progress.global_step < run.max_train_steps:
            loss, grad_norm = optimizer_step(run, batches)
            progress.global_step += 1
            progress.training_seconds += time.perf_counter() - clock
            clock = time.perf_counter()
            step = progress.global_step
            monitor.update(loss, step)
            bar.update()
            at_deadline = step < run.max_train_steps and past_deadline(run, step % config.logging_steps == 0)
            if at_deadline:  # the run ends here: the end-of-run logging, checkpoint and evaluation follow
                logger.warning(f"--max_train_minutes {config.max_train_minutes:g}: the deadline came at step {step} "
                               f"of {run.max_train_steps}; saving a checkpoint and the pipeline.")
                run.max_train_steps = progress.total_steps = step
                bar.total = step

            if step % config.logging_steps == 0 or step == run.max_train_steps:
                log_metrics(run, monitor, grad_norm, throughput, bar)
            stop = stop_agreed(run.accelerator, received, at_sync_point=step % config.logging_steps == 0)
            if step % config.checkpointing_steps == 0 or stop or at_deadline:
                checkpoint(run, monitor)
                pushes_checkpoints = config.push_to_hub and config.hub_strategy == "checkpoint"
                if pushes_checkpoints and not stop and step < run.max_train_steps:
                    save(run)  # the EMA pipeline, its card and a grid into output_dir (all processes take part)
                    push(config, run.repo_id, f"Checkpoint at step {step} (ddpm_hf)", fatal=False)
                throughput.restart(step)
            if stop:
                name = received[0] if received else "a signal to another process"
                logger.warning(f"Stopped by {name} at step {step}, after saving a checkpoint. "
                               "Continue with --resume_from_checkpoint latest.")
                return name
            if step % config.save_images_steps == 0 and step < run.max_train_steps:  # the last grid comes with save()
                log_sample_grid(run)
                throughput.restart(step)
            periodic = config.eval_every is not None and step % config.eval_every == 0
            if periodic or (step == run.max_train_steps and (config.eval_every is not None or config.eval_at_end)):
                measure_quality(run)
                throughput.restart(step)
    return None


def global_batch_size(run: Run) -> int:
    """Images per optimizer step, over all processes and micro-batches."""
    config = run.config
    return config.train_batch_size * run.accelerator.num_processes * config.gradient_accumulation_steps


def checkpoint(run: Run, monitor: LossMonitor):
    """Save a checkpoint, unless a NaN/inf loss came since the last one (then raise instead)."""
    check_finite(run, monitor)
    path = save_checkpoint(run.accelerator, run.config.output_dir, run.progress, weight_hashes(run),
                           run.data.dataset, run.ema, parameter_names(run), run.config.checkpoints_total_limit,
                           checkpoint_bytes(run.unet, run.ema is not None))
    logger.info(f"Saved {path}")


def optimizer_step(run: Run, batches: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients over `gradient_accumulation_steps` micro-batches, step, update the EMA.

    Returns the mean loss and the gradient norm before clipping, as tensors (no device sync).
    """
    config, accelerator = run.config, run.accelerator
    losses = []
    for micro_step in range(config.gradient_accumulation_steps):
        generator = step_generator(config.seed, run.progress.global_step, micro_step, accelerator.process_index,
                                   accelerator.device)
        with accelerator.accumulate(run.model):
            loss, grad_norm = train_step(run, next(batches), generator)
        losses.append(loss)
    if run.ema is not None:
        run.ema.step(run.unet.parameters())
    return torch.stack(losses).mean(), grad_norm


def train_step(
    run: Run, clean_images: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: draw t and x_t ~ q(x_t | x_0), regress the target, backpropagate; at the end of an
    accumulation also clip, step the optimizer and the LR schedule. Returns the loss and, then, the grad norm."""
    accelerator, scheduler, config = run.accelerator, run.noise_scheduler, run.config
    clean_images = clean_images.to(accelerator.device, memory_format=run.memory_format, non_blocking=True)
    noise = torch.randn(clean_images.shape, generator=generator, device=clean_images.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                              generator=generator, device=clean_images.device)  # (B,)
    noisy_images = scheduler.add_noise(clean_images, noise, timesteps)  # Ho et al. 2020, eq. 4

    model_output = run.model(noisy_images, timesteps).sample
    loss = training_loss(scheduler, model_output, clean_images, noise, noisy_images, timesteps, config.snr_gamma,
                         config.vlb_weight)
    accelerator.backward(loss)

    grad_norm = None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def step_generator(seed: int, step: int, micro_step: int, process_index: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise and timesteps, seeded by its coordinates alone (not by RNG
    history), so that a resumed run draws exactly what an uninterrupted one would."""
    key = np.random.SeedSequence([seed, step, micro_step, process_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device).manual_seed(int(key))


def endless_batches(dataloader: DataLoader, progress: Progress) -> Iterator[torch.Tensor]:
    """Micro-batches epoch after epoch from where `progress` says, keeping its epoch and position current."""
    dataset = dataloader.dataset
    while True:
        dataset.set_epoch(progress.epoch)
        if isinstance(dataloader.sampler, DistributedSampler):
            dataloader.sampler.set_epoch(progress.epoch)
        epoch_batches = dataloader
        if progress.batches_in_epoch and not isinstance(dataset, IterableDataset):
            # A resumed epoch: skip the batches already used, without loading them. (A stream resumes by its state.)
            epoch_batches = skip_first_batches(dataloader, progress.batches_in_epoch)
        for batch in epoch_batches:
            progress.batches_in_epoch += 1
            yield batch
        if progress.batches_in_epoch == 0:
            raise ValueError("An epoch of the training data produced no full batch: lower --train_batch_size.")
        progress.epoch += 1
        progress.batches_in_epoch = 0


# Monitoring


def check_finite(run: Run, monitor: LossMonitor):
    """Raise `NonFiniteLossError` if any process has seen a NaN/inf loss (a sync: call it on every process)."""
    bad_step = monitor.first_nonfinite_step(run.accelerator)
    if bad_step is None:
        return
    checkpoints = list_checkpoints(run.config.output_dir)
    last_good = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved before it"
    raise NonFiniteLossError(
        f"The loss became NaN or inf at step {bad_step} (noticed at step {run.progress.global_step}); training "
        f"stopped without saving anything after it, and {last_good}. Lower --learning_rate, lengthen "
        "--lr_warmup_steps, check the data, or use --mixed_precision no."
    )


def log_metrics(run: Run, monitor: LossMonitor, grad_norm: torch.Tensor, throughput: Throughput, bar: tqdm):
    """Check the loss is finite, then log loss, lr, grad norm, images/s (and EMA decay) to trackers and the bar."""
    check_finite(run, monitor)
    step = run.progress.global_step
    logs = {
        "loss": monitor.pop_mean(run.accelerator),
        "lr": run.lr_scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "images_per_s": throughput.read(step),
        "epoch": run.progress.epoch,
    }
    if run.ema is not None:
        logs["ema_decay"] = run.ema.cur_decay_value
    run.accelerator.log(logs, step=step)
    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['images_per_s']:.0f}")


def parameter_names(run: Run) -> list[str]:
    """The UNet's parameter names, in the order of the EMA's averages."""
    return [name for name, _ in run.unet.named_parameters()]


def weight_hashes(run: Run) -> dict[str, str]:
    """Hashes of this process's weights and EMA, recorded in checkpoints to show that processes agree."""
    hashes = {"unet": weights_sha256(run.unet.parameters())}
    if run.ema is not None:
        hashes["ema"] = weights_sha256(run.ema.shadow_params)
    return hashes


# Sampling and saving


@contextmanager
def sampling_mode(unet: torch.nn.Module, ema: EMAModel | None) -> Iterator[None]:
    """Put `unet` in eval mode with the EMA weights swapped in; on exit, the trained weights and mode come back."""
    was_training = unet.training
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    unet.eval()
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(unet.parameters())
        unet.train(was_training)


def sampling_pipeline(run: Run) -> DDPMPipeline:
    """A quiet pipeline around the training UNet (put it in `sampling_mode` before calling it)."""
    pipeline = DDPMPipeline(unet=run.unet, scheduler=DDPMScheduler.from_config(run.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def log_sample_grid(run: Run):
    """Sample a grid with the EMA weights, save it as samples/step_{N}.png and log it (main process only)."""
    if not run.accelerator.is_main_process:
        return
    config, step = run.config, run.progress.global_step
    pipeline = sampling_pipeline(run)
    with sampling_mode(run.unet, run.ema):
        grid = sample_grid(pipeline, config.eval_batch_size, config.ddpm_num_inference_steps, config.seed)
    path = Path(config.output_dir) / SAMPLES_DIR / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    log_grid(run.accelerator, grid, step)


def measure_quality(run: Run):
    """Generate `eval_num_samples` images with the EMA weights and `eval_sampler`, compare them with the training data
    (the digits classifier's features for the embedded digits, Inception's otherwise); log the metrics as `eval/...`
    and keep them for `eval_results.json` and the model card (main process only)."""
    if run.quality_reference is None:
        return
    config, step = run.config, run.progress.global_step
    extractor, reference_set, floor = run.quality_reference
    sampler = f"{config.eval_sampler}, {config.eval_steps} steps"
    logger.info(f"Step {step}: measuring sample quality on {config.eval_num_samples} images ({sampler})...")
    pipeline = sampling_pipeline(run)
    pipeline.scheduler = get_sampler(config.eval_sampler).make_scheduler(pipeline.scheduler.config)
    start = time.perf_counter()
    with sampling_mode(run.unet, run.ema):
        images = generate_images(pipeline, config.eval_num_samples, num_inference_steps=config.eval_steps,
                                 seed=config.seed)
    result = compare(images, extractor, reference_set)
    result.floor = floor
    seconds = time.perf_counter() - start
    metrics = result.metrics()
    run.accelerator.log({f"eval/{name}": value for name, value in metrics.items()}, step=step)
    logger.info(f"Step {step}: {format_quality(result)}; " + ", ".join(f"{name} {value:.4g}" for name, value in
                metrics.items() if name != "frechet_distance") + f" ({sampler}, {seconds:.1f} s)")
    run.evaluation = {**result.to_dict(), "scheduler": config.eval_sampler, "steps": config.eval_steps,
                      "seed": config.seed, "seconds": round(seconds, 1)}


def log_grid(accelerator: Accelerator, grid: Image.Image, step: int):
    """Send a sample grid to every tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({"samples": [grid]}, step=step)


def save(run: Run) -> DDPMPipeline:
    """Save the pipeline with the EMA weights (safetensors), the raw weights in unet_raw/, and a final sample
    grid (and GIF) to output_dir, through a staging folder published durably; returns the pipeline on every
    process. If it cannot be written, the staging folder goes and every process raises `WriteFailedError`."""
    config, accelerator = run.config, run.accelerator
    pipeline = DDPMPipeline(unet=unet_copy(run, use_ema=True),
                            scheduler=DDPMScheduler.from_config(run.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    output_dir = Path(config.output_dir)
    staging = output_dir / ".final.tmp"
    failure = functools.partial(write_failure, "the pipeline", output_dir,
                                bytes_needed=pipeline_bytes(run.unet, run.ema is not None))
    with all_or_none(accelerator, failure, cleanup=lambda: shutil.rmtree(staging, ignore_errors=True)):
        if accelerator.is_main_process:
            grid = write_pipeline(run, pipeline, staging)
            publish(staging, output_dir)
    if accelerator.is_main_process:
        log_grid(accelerator, grid, run.progress.global_step)
        logger.info(f"Saved the pipeline and {FINAL_GRID} to {output_dir}")
    accelerator.wait_for_everyone()
    return pipeline


def write_pipeline(run: Run, pipeline: DDPMPipeline, staging: Path) -> Image.Image:
    """Write the pipeline, raw weights, run record, evaluation, model card and final grid into `staging`."""
    config = run.config
    shutil.rmtree(staging, ignore_errors=True)  # debris of a save that crashed
    pipeline.save_pretrained(staging, safe_serialization=True)
    if run.ema is not None:
        unet_copy(run, use_ema=False).save_pretrained(staging / RAW_UNET_DIR, safe_serialization=True)
    gif_path = staging / DENOISING_GIF if config.save_denoising_gif else None
    grid = sample_grid(pipeline, config.eval_batch_size, config.ddpm_num_inference_steps, config.seed, gif_path)
    grid.save(staging / FINAL_GRID)
    write_run_record(run, staging, finished=True)
    if run.evaluation is not None:
        (staging / EVAL_RESULTS_FILE).write_text(json.dumps(run.evaluation, indent=2) + "\n", encoding="utf-8")
    write_model_card(staging, run.repo_id)
    return grid


def push(config: TrainingConfig, repo_id: str | None, commit_message: str, fatal: bool = True):
    """Upload output_dir's pipeline, card and samples (never checkpoints) to `repo_id`, if pushing.

    A failed push at a checkpoint (`fatal=False`) is a warning: training goes on and the next push retries.
    """
    if repo_id is None:
        return
    try:
        commit = push_to_hub(config.output_dir, repo_id, private=config.hub_private_repo, token=config.hub_token,
                             commit_message=commit_message)
    except HubPushError as error:
        if fatal:
            raise
        logger.warning(f"{error}\nTraining goes on; the next checkpoint or the end pushes again.")
        return
    logger.info(f"Pushed the pipeline to {commit.repo_url}")


def unet_copy(run: Run, use_ema: bool) -> UNet2DModel:
    """A separate eval-mode UNet with the trained weights, or the EMA weights when `use_ema` and there are some."""
    unet = UNet2DModel.from_config(run.unet.config)
    unet.load_state_dict(run.unet.state_dict())
    if use_ema and run.ema is not None:
        run.ema.copy_to(unet.parameters())
    return unet.to(run.accelerator.device).eval()
