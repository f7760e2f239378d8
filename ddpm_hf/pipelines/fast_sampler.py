"""The measured fast sampler of a saved pipeline: `scheduler/fast_scheduler_config.json`.

`ddpm-hf sweep MODEL --save` writes it: a second scheduler config beside `scheduler/scheduler_config.json`,
for the sampler and number of steps that reached the model's best quality with the fewest model calls.
diffusers reads only `scheduler_config.json`, so the pipeline loads in plain diffusers exactly as before;
the file is a plain diffusers scheduler config (its `_class_name` and settings), so plain diffusers can use
it too (`DPMSolverMultistepScheduler.from_config(json.load(f))`). ddpm_hf's own keys start with `_`, which
diffusers' `from_config` skips:

    "_ddpm_hf_sampler": "dpm-solver",          # a name of ddpm_hf.schedulers.samplers.SAMPLERS
    "_ddpm_hf_num_inference_steps": 10,
    "_ddpm_hf_measurement": {...},             # what the sweep measured (distances, floor, speed-up)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import SchedulerMixin

from ..schedulers.samplers import get_sampler
from ..utils.atomic_files import write_json_atomically

FAST_SCHEDULER_CONFIG = "fast_scheduler_config.json"
# What the sweep measured, saved beside the pipeline with it (the model card shows the plot).
SWEEP_FILE, SWEEP_PLOT = "sampler_sweep.json", "sampler_sweep.png"
_SAMPLER_KEY, _STEPS_KEY, _MEASUREMENT_KEY = "_ddpm_hf_sampler", "_ddpm_hf_num_inference_steps", "_ddpm_hf_measurement"


@dataclass
class FastSampler:
    """A sampler, its number of steps and its scheduler config, as measured for one model."""

    sampler: str  # a name of `SAMPLERS`, e.g. "dpm-solver"
    num_inference_steps: int
    scheduler_config: dict[str, Any]  # the scheduler's diffusers config, with its `_class_name`
    measurement: dict[str, Any] = field(default_factory=dict)  # what `ddpm-hf sweep` measured

    @classmethod
    def from_scheduler(cls, sampler: str, scheduler: SchedulerMixin, num_inference_steps: int,
                       measurement: dict[str, Any] | None = None) -> "FastSampler":
        config = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
        config = {"_class_name": type(scheduler).__name__, **config}
        return cls(sampler, num_inference_steps, config, dict(measurement or {}))

    def make_scheduler(self) -> SchedulerMixin:
        """A new scheduler of the measured class and settings."""
        return get_sampler(self.sampler).scheduler_class.from_config(self.scheduler_config)

    def save(self, pipeline_folder: str | os.PathLike) -> Path:
        """Write `scheduler/fast_scheduler_config.json` atomically (a temporary file renamed over it); nothing
        else in the folder is touched."""
        path = Path(pipeline_folder) / "scheduler" / FAST_SCHEDULER_CONFIG
        record = {**self.scheduler_config, _SAMPLER_KEY: self.sampler, _STEPS_KEY: self.num_inference_steps,
                  _MEASUREMENT_KEY: self.measurement}
        write_json_atomically(path, record)
        return path

    @classmethod
    def load(cls, pipeline_folder: str | os.PathLike) -> "FastSampler | None":
        """The folder's fast sampler, or None if it has none.

        Raises:
            ValueError: if the file is not valid JSON, or names an unknown sampler or a class that is not its own.
        """
        path = Path(pipeline_folder) / "scheduler" / FAST_SCHEDULER_CONFIG
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            sampler, steps = record.pop(_SAMPLER_KEY), int(record.pop(_STEPS_KEY))
            measurement = record.pop(_MEASUREMENT_KEY, {})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a fast sampler config ({error}); delete it, or write it again with "
                             "`ddpm-hf sweep MODEL --save`.") from error
        expected = get_sampler(sampler).scheduler_class.__name__
        if record.get("_class_name") != expected:
            raise ValueError(f"{path} names the sampler {sampler!r}, whose class is {expected}, but holds a "
                             f"{record.get('_class_name')} config; write it again with `ddpm-hf sweep MODEL --save`.")
        return cls(sampler, steps, record, measurement)
