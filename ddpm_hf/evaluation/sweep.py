"""The sampler sweep: every (sampler, steps) pair from the same seeds, scored, and the cheapest of full quality.

```py
>>> from ddpm_hf.evaluation import sweep_samplers
>>> sweep = sweep_samplers(pipe, ["ddpm", "dpm-solver-sde", "unipc"], [10, 20, 1000], num_samples=360)
>>> sweep.recommendation.sampler, sweep.recommendation.steps  # on the README main job's model
('dpm-solver-sde', 20)
```
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import diffusers
import torch
from tqdm.auto import tqdm

from ..pipelines import DDPMPipeline
from ..pipelines.fast_sampler import FastSampler
from ..schedulers.samplers import SAMPLERS, SWEEP_SAMPLERS, check_num_steps, get_sampler, sweep_steps
from .evaluate import EvaluationResult, compare, generate_images, prepare_evaluation
from .floor import RealDataFloor


@dataclass
class SweepPoint:
    """One (sampler, steps) pair: its cost and its scores."""

    sampler: str
    steps: int
    model_calls: int  # UNet evaluations per image (the pipeline calls it once per timestep of the schedule)
    seconds: float  # wall time of sampling all images (not of scoring them)
    images_per_second: float
    result: EvaluationResult

    @property
    def frechet_distance(self) -> float:
        return self.result.frechet_distance

    def to_dict(self) -> dict[str, Any]:
        scores = {name: value for name, value in asdict(self.result).items()
                  if name not in ("num_samples", "num_reference", "features", "reference")}
        return {"sampler": self.sampler, "steps": self.steps, "model_calls": self.model_calls, **scores,
                "seconds": self.seconds, "images_per_second": self.images_per_second}


@dataclass
class SamplerSweep:
    """The scored pairs, the real-data floor and the recommendation (the cheapest pair within `tolerance` of the
    best distance)."""

    points: list[SweepPoint]
    tolerance: float  # distances within this of the best count as equally good
    tolerance_source: str  # "the floor's standard deviation", or "given"
    floor: RealDataFloor | None
    num_samples: int
    seed: int
    batch_size: int
    num_train_timesteps: int
    reference: str
    features: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # per sampler: class and settings
    device: str = "cpu"  # where the model sampled, for the record of the timings

    @property
    def best(self) -> SweepPoint:
        return min(self.points, key=lambda point: point.frechet_distance)

    @property
    def recommendation(self) -> SweepPoint:
        """The pair with the fewest model calls whose distance is within `tolerance` of the best (ties: the closer)."""
        good = [point for point in self.points if point.frechet_distance <= self.best.frechet_distance + self.tolerance]
        return min(good, key=lambda point: (point.model_calls, point.frechet_distance))

    def point(self, sampler: str, steps: int) -> SweepPoint | None:
        return next((p for p in self.points if (p.sampler, p.steps) == (sampler, steps)), None)

    @property
    def speedup(self) -> float:
        """Model calls of the full DDPM chain (`num_train_timesteps`) over the recommendation's."""
        return self.num_train_timesteps / self.recommendation.model_calls

    def measurement(self) -> dict[str, Any]:
        """What the recommendation rests on, in a few numbers: saved with it, shown on the model card."""
        recommended, baseline = self.recommendation, self.point("ddpm", self.num_train_timesteps)
        return {
            "frechet_distance": recommended.frechet_distance,
            "model_calls": recommended.model_calls,
            "speedup": self.speedup,
            "ddpm_frechet_distance": None if baseline is None else baseline.frechet_distance,
            "best": {"sampler": self.best.sampler, "steps": self.best.steps,
                     "frechet_distance": self.best.frechet_distance},
            "tolerance": self.tolerance,
            "floor": None if self.floor is None else self.floor.to_dict(),
            "num_samples": self.num_samples,
            "reference": self.reference,
            "features": self.features,
        }

    def report(self) -> str:
        """The table of pairs, the floor and the tolerance, and the recommendation, as printed by `ddpm-hf sweep`."""
        lines = [f"{'sampler':<16} {'steps':>5} {'calls':>5} {'FD':>9} {'KID':>9} {'prec':>5} {'recall':>6} "
                 f"{'s':>7} {'img/s':>7}"]
        for point in self.points:
            result = point.result
            lines.append(f"{point.sampler:<16} {point.steps:>5} {point.model_calls:>5} {point.frechet_distance:>9.3f} "
                         f"{result.kid:>9.2f} {result.precision:>5.2f} {result.recall:>6.2f} {point.seconds:>7.1f} "
                         f"{point.images_per_second:>7.1f}")
        if self.floor is not None:
            floor = self.floor
            lines.append(f"Real-data floor: {floor.frechet_distance:.3f} ± {floor.std:.3f} ({floor.num_images} images "
                         f"of {floor.description}; standard deviation over {floor.num_partitions} random partitions "
                         "of the real images)")
        best, recommended = self.best, self.recommendation
        lines.append(f"Tolerance: {self.tolerance:.3f} ({self.tolerance_source}). Best: {best.sampler}, {best.steps} "
                     f"steps, FD {best.frechet_distance:.3f}.")
        lines.append(f"Recommended: {recommended.sampler}, {recommended.steps} steps ({recommended.model_calls} model "
                     f"calls, FD {recommended.frechet_distance:.3f}): {self.speedup:.0f}x fewer model calls than "
                     f"{self.num_train_timesteps} DDPM steps. Seconds are of this machine, under its load at the time.")
        return "\n".join(lines)

    def fast_sampler(self, pipeline: DDPMPipeline) -> FastSampler:
        """The recommendation, as the fast sampler `pipeline` (the swept one) saves and loads."""
        recommended = self.recommendation
        scheduler = get_sampler(recommended.sampler).make_scheduler(pipeline.scheduler.config)
        return FastSampler.from_scheduler(recommended.sampler, scheduler, recommended.steps, self.measurement())

    def to_dict(self) -> dict[str, Any]:
        recommended = self.recommendation
        return {
            "num_samples": self.num_samples, "seed": self.seed, "batch_size": self.batch_size,
            "num_train_timesteps": self.num_train_timesteps, "reference": self.reference, "features": self.features,
            "floor": None if self.floor is None else self.floor.to_dict(),
            "tolerance": self.tolerance, "tolerance_source": self.tolerance_source,
            "best": {"sampler": self.best.sampler, "steps": self.best.steps},
            "recommendation": {"sampler": recommended.sampler, "steps": recommended.steps, "speedup": self.speedup},
            "samplers": self.settings,
            "points": [point.to_dict() for point in self.points],
            "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "device": _device_name(self.device), "python": platform.python_version()},
        }


def check_sweep(samplers: Sequence[str], steps: Sequence[int], num_train_timesteps: int) -> None:
    """A `ValueError` for an unknown sampler, no sampler or step count, or a step count out of range."""
    if not samplers or not steps:
        raise ValueError(f"Give at least one sampler and one step count (e.g. --samplers {','.join(SWEEP_SAMPLERS)} "
                         f"--steps {','.join(map(str, sweep_steps(num_train_timesteps)))}).")
    for name in samplers:
        get_sampler(name)
    for count in steps:
        check_num_steps(count, num_train_timesteps)


def sweep_samplers(
    pipeline: DDPMPipeline,
    samplers: Sequence[str] = SWEEP_SAMPLERS,
    steps: Sequence[int] | None = None,
    num_samples: int = 360,
    *,
    batch_size: int = 64,
    seed: int = 0,
    floor_split: str | None = "test",
    tolerance: float | None = None,
    show_progress: bool = False,
    pairs: Sequence[tuple[str, int]] | None = None,
    **reference_kwargs: Any,
) -> SamplerSweep:
    """Sample `num_samples` images with every (sampler, steps) pair, image i from the noise of seed + i in every pair,
    and score each pair against a reference (see [`prepare_reference`]).

    Everything is checked (samplers, steps, the reference and the floor) before the first image is sampled.

    Args:
        pipeline ([`DDPMPipeline`]): The model; its scheduler's config gives every sampler its betas.
        samplers (`Sequence[str]`): Names of [`SAMPLERS`].
        steps (`Sequence[int]`, *optional*): Step counts, each in `[1, num_train_timesteps]`; by default 5, 10, 20,
            50 and `num_train_timesteps`.
        num_samples (`int`): Images per pair.
        batch_size (`int`): Images sampled at a time.
        seed (`int`): Image i starts from the noise of seed + i.
        floor_split (`str`, *optional*): The reference's held-out split, for the real-data floor (see
            [`real_data_floor`]); `None`: no floor, and `tolerance` must be given.
        tolerance (`float`, *optional*): How far above the best distance a pair may be and still be recommended;
            defaults to the floor's standard deviation.
        show_progress (`bool`): One progress bar over the whole sweep, with its ETA.
        pairs (`Sequence[tuple[str, int]]`, *optional*): The (sampler, steps) pairs to try, instead of every
            sampler with every step count.
        reference_kwargs: The reference and the features, see [`prepare_reference`].

    Raises:
        ValueError: for an unknown sampler, a step count out of range, a reference the samples cannot be compared
            with, a held-out split that cannot be loaded, or neither a floor nor a tolerance.
    """
    scheduler_config = dict(pipeline.scheduler.config)
    num_train_timesteps = scheduler_config["num_train_timesteps"]
    steps = sweep_steps(num_train_timesteps) if steps is None else steps
    pairs = [(name, count) for name in samplers for count in steps] if pairs is None else pairs
    check_sweep([name for name, _ in pairs], [count for _, count in pairs], num_train_timesteps)
    if tolerance is not None and tolerance < 0:
        raise ValueError(f"The tolerance must be >= 0, got {tolerance}.")
    if floor_split is None and tolerance is None:
        raise ValueError("Without a held-out split there is no floor to take the tolerance from: give a tolerance "
                         "(--tolerance), or the reference's held-out split (--floor-split).")
    extractor, reference_set, floor = prepare_evaluation(pipeline, num_samples, floor_split, **reference_kwargs)

    pairs = [(get_sampler(name), count) for name, count in pairs]
    schedulers = [sampler.make_scheduler(scheduler_config) for sampler, _ in pairs]
    calls = [_model_calls(scheduler, count) for scheduler, (_, count) in zip(schedulers, pairs)]
    num_batches = math.ceil(num_samples / batch_size)
    bar = tqdm(total=num_batches * sum(calls), desc=f"Sweep: {len(pairs)} pairs x {num_samples} images",
               unit="call", disable=not show_progress)
    points = []
    original_scheduler = pipeline.scheduler
    try:
        for (sampler, count), scheduler, model_calls in zip(pairs, schedulers, calls):
            bar.set_postfix_str(f"{sampler.name}, {count} steps")
            pipeline.scheduler = scheduler
            start = time.perf_counter()
            images = generate_images(pipeline, num_samples, batch_size=batch_size, num_inference_steps=count,
                                     seed=seed, bar=bar)
            seconds = time.perf_counter() - start
            points.append(SweepPoint(sampler.name, count, model_calls, round(seconds, 2),
                                     round(num_samples / seconds, 2), compare(images, extractor, reference_set)))
    finally:
        pipeline.scheduler = original_scheduler
        bar.close()
    settings = {name: {"class": SAMPLERS[name].scheduler_class.__name__, "settings": SAMPLERS[name].settings,
                       "method": SAMPLERS[name].method} for name in dict.fromkeys(sampler.name for sampler, _ in pairs)}
    return SamplerSweep(
        points, floor.std if tolerance is None else tolerance,
        "the floor's standard deviation" if tolerance is None else "given", floor, num_samples, seed, batch_size,
        num_train_timesteps, reference_set.description, extractor.name, settings, str(pipeline.device),
    )


def _model_calls(scheduler, steps: int) -> int:
    """UNet evaluations per image: one per timestep of the schedule (PNDM's, for one, is not `steps` long)."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
