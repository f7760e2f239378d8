"""`--max_train_minutes`: a wall-clock budget, turned once into the number of steps that fit in it.

A short calibration times the run's own optimizer step (and the UNet's sampling call) and then puts every state
back, so the run continues as if it had not happened. The steps that fit in the budget, after the sample grids,
evaluations and checkpoints due on the way and the final save, become the run's length and the LR schedule's
horizon. The decision is taken once: every checkpoint records it, and a resumed run keeps it, so exact resume holds.
The run also stops at the deadline itself (a checkpoint, the saved pipeline, exit status 0) if the estimate was off.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.logging import get_logger

if TYPE_CHECKING:
    from .loop import Run

logger = get_logger(__name__)

_WARMUP_STEPS = 2  # untimed: allocations, oneDNN/cuDNN plans and torch.compile happen in the first steps
_TIMED_STEPS = 5
_WRITE_BYTES_PER_S = 200e6  # a checkpoint's write speed, for its cost: a conservative local disk


@dataclass(frozen=True)
class StepCosts:
    """What calibration measured: seconds per optimizer step, and per UNet call at the grid's and evaluation's
    batch sizes (sampling)."""

    step_s: float
    grid_call_s: float
    eval_call_s: float


def calibrate(run: Run) -> StepCosts:
    """Times the run's optimizer step on a synthetic batch of its shape, and a sampling call of the UNet, then
    restores weights, optimizer, LR schedule, EMA, gradient scaler and RNG states. Every process takes part (the
    slowest sets the pace)."""
    from .loop import optimizer_step  # the loop imports this module

    accelerator, config = run.accelerator, run.config
    saved = _snapshot(run)
    # A synthetic batch of the data's shape: drawing real ones would move the data order.
    channels, size = run.unet.config.in_channels, config.data.resolution
    batch = torch.randn(config.train_batch_size, channels, size, size, generator=torch.Generator().manual_seed(0))
    batches = itertools.repeat(batch)
    for _ in range(_WARMUP_STEPS):
        optimizer_step(run, batches)
    _synchronize(accelerator.device)
    started = time.perf_counter()
    for _ in range(_TIMED_STEPS):
        optimizer_step(run, batches)
    _synchronize(accelerator.device)
    step_s = (time.perf_counter() - started) / _TIMED_STEPS
    grid_call_s, eval_call_s = _sampling_costs(run)
    _restore(run, saved)
    measured = torch.tensor([step_s, grid_call_s, eval_call_s], device=accelerator.device)
    slowest = accelerator.gather(measured[None]).max(dim=0).values.tolist()
    return StepCosts(*slowest)


def end_of_run_s(run: Run, costs: StepCosts) -> float:
    """Estimated seconds of the end of the run: the final sample grid, the final evaluation, a checkpoint and saving."""
    config = run.config
    return _grid_s(config, costs) + _evaluation_s(config, costs) + _checkpoint_s(run)


def fitting_steps(run: Run, costs: StepCosts, seconds_left: float) -> int:
    """The optimizer steps that fit in `seconds_left`, with the grids, evaluations and checkpoints due every so many
    steps on the way, and the end of the run."""
    config = run.config
    periodic = [(config.save_images_steps, _grid_s(config, costs)), (config.checkpointing_steps, _checkpoint_s(run))]
    if config.eval_every is not None:
        periodic.append((config.eval_every, _evaluation_s(config, costs)))
    # Real steps also load data and log: 5% more than the calibrated step, so that the deadline rarely cuts the run.
    return steps_that_fit(seconds_left - end_of_run_s(run, costs), 1.05 * costs.step_s, periodic)


def steps_that_fit(seconds: float, step_s: float, periodic: list[tuple[int, float]]) -> int:
    """The most steps of `step_s` seconds that fit in `seconds`, where each `(every, cost)` of `periodic` costs
    `cost` seconds after every `every`-th step before the last (the last step's grid, evaluation and checkpoint are
    the end of the run's). Counted, not spread over the steps: a 900-step run pays for one grid every 500 steps,
    not for 1.8."""
    def run_s(steps: int) -> float:
        return steps * step_s + sum((steps - 1) // every * cost for every, cost in periodic)

    if seconds < step_s:
        return 0
    low, high = 1, int(seconds / step_s)  # run_s(low) <= seconds, and run_s(steps) >= steps * step_s
    while low < high:  # run_s only grows with the steps: bisect for the last that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if run_s(middle) <= seconds else (low, middle - 1)
    return low


def fit_to_budget(run: Run, started: float) -> None:
    """Decides the run's length from `--max_train_minutes` (the clock started at `started`, `time.perf_counter()`),
    sets the LR schedule's horizon to it, and the deadline.

    Raises:
        ValueError: if not one step fits after calibration (naming the minutes that would).
    """
    from diffusers.optimization import get_scheduler

    config, progress = run.config, run.progress
    budget_s = config.max_train_minutes * 60 - progress.training_seconds  # a resumed run has spent some already
    if progress.total_steps is not None:  # resumed: the length was decided when the run started
        run.max_train_steps = progress.total_steps
        run.deadline = started + budget_s - end_of_run_s(run, StepCosts(0.0, *_sampling_costs(run)))
        return
    costs = calibrate(run)
    steps = fitting_steps(run, costs, budget_s - (time.perf_counter() - started))
    end_s = end_of_run_s(run, costs)
    if steps < 1:
        needed = (time.perf_counter() - started + end_s + 10 * costs.step_s) / 60
        raise ValueError(f"--max_train_minutes {config.max_train_minutes:g} leaves no time to train: a step takes "
                         f"{costs.step_s:.3g} s and the end of the run (the final sample grid, evaluation and "
                         f"saving) about {end_s:.0f} s. Give at least {math.ceil(needed * 10) / 10:g} minutes.")
    run.max_train_steps = min(run.max_train_steps, steps)
    progress.total_steps = run.max_train_steps
    run.deadline = started + budget_s - end_s
    # The LR schedule was built for --max_train_steps: rebuild it for the decided length (it has not moved yet).
    optimizer = run.lr_scheduler.scheduler.optimizer
    run.lr_scheduler.scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                               num_training_steps=run.max_train_steps)
    logger.info(f"--max_train_minutes {config.max_train_minutes:g}: a step takes {costs.step_s:.3g} s, so the run "
                f"trains for {run.max_train_steps} steps (the LR schedule's horizon), leaving ~{end_s:.0f} s for the "
                "final grid and saving.")
    if config.lr_warmup_steps >= run.max_train_steps:
        logger.warning(f"--lr_warmup_steps {config.lr_warmup_steps} is not shorter than the {run.max_train_steps} "
                       "steps that fit in the budget: the learning rate never reaches its peak. Lower it.")


def past_deadline(run: Run, at_sync_point: bool) -> bool:
    """Whether the run's deadline has passed. Alone: checked at every step. With several processes, only at sync
    points (the logging steps), where the processes agree (a collective), so that all of them stop at one step."""
    if run.deadline is None:
        return False
    passed = time.perf_counter() >= run.deadline
    if run.accelerator.num_processes == 1:
        return passed
    if not at_sync_point:
        return False
    flags = run.accelerator.gather(torch.tensor([float(passed)], device=run.accelerator.device))
    return bool(flags.max() > 0)


def _grid_s(config, costs: StepCosts) -> float:
    return config.ddpm_num_inference_steps * costs.grid_call_s


def _evaluation_s(config, costs: StepCosts) -> float:
    """One quality measurement: `eval_num_samples` images, 64 at a time, `eval_steps` calls each (features: small)."""
    if config.eval_every is None and not config.eval_at_end:
        return 0.0
    return math.ceil(config.eval_num_samples / 64) * config.eval_steps * costs.eval_call_s


def _checkpoint_s(run: Run) -> float:
    """A checkpoint's writing time: weights, two Adam moments and the EMA in float32, at a conservative disk speed."""
    parameters = sum(p.numel() for p in run.unet.parameters())
    return 0.2 + parameters * 4 * (4 if run.ema is not None else 3) / _WRITE_BYTES_PER_S


def _sampling_costs(run: Run) -> tuple[float, float]:
    return _sampling_call_s(run, run.config.eval_batch_size), _sampling_call_s(run, 64)


def _snapshot(run: Run) -> dict:
    accelerator = run.accelerator
    return {
        "model": copy.deepcopy(run.unet.state_dict()),
        "optimizer": copy.deepcopy(run.optimizer.state_dict()),
        "lr_scheduler": copy.deepcopy(run.lr_scheduler.state_dict()),
        "ema": copy.deepcopy(run.ema.state_dict()) if run.ema is not None else None,
        "scaler": copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler is not None else None,
        "accelerator_step": accelerator.step,
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _restore(run: Run, saved: dict) -> None:
    accelerator = run.accelerator
    run.unet.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(saved["ema"])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    accelerator.step = saved["accelerator_step"]
    torch.set_rng_state(saved["cpu_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


@torch.no_grad()
def _sampling_call_s(run: Run, batch_size: int) -> float:
    """Seconds of one UNet call at `batch_size` in eval mode, as sampling makes it (median of three, after one)."""
    unet, device = run.unet, run.accelerator.device
    was_training = unet.training
    unet.eval()
    size = run.config.data.resolution
    # Its own generator, and no dropout in eval mode: the global RNG (dropout's) is left where it was.
    sample = torch.randn(batch_size, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    sample = sample.to(device)
    timestep = torch.tensor(500, device=device)
    times = []
    for _ in range(4):
        started = time.perf_counter()
        unet(sample, timestep)
        _synchronize(device)
        times.append(time.perf_counter() - started)
    unet.train(was_training)
    return sorted(times[1:])[1]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
