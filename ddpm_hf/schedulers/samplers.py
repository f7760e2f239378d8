"""Samplers: the schedulers that sample from a model trained as a DDPM, each set up for few steps.

A DDPM's network predicts the noise of q(x_t | x_0) at every training timestep, so any scheduler that
reads the same betas can run the reverse process: ancestral sampling (the paper's), or a solver of the
probability-flow ODE that takes large steps. [`Sampler.make_scheduler`] builds one from the model's
own scheduler config (betas, prediction type, clipping) with the settings below, which follow each
method's paper and diffusers' documentation for an unconditional pixel-space model:

- every sampler starts from pure noise at the last training timestep (Lin et al. 2024, "Common diffusion
  noise schedules and sample steps are flawed", Table 2: "trailing" or "linspace" spacing, never
  "leading", which starts 1 - 1/n of the way and leaves the model a noisier input than it expects);
- the ODE solvers predict x_0 and clip it to the data's [-1, 1] as the DDPM sampler does (dynamic
  thresholding with `sample_max_value=1` is exactly that clip).

`ddpm-hf sweep` measures which of them reaches the 1,000-step quality with the fewest model calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import diffusers
from diffusers import SchedulerMixin

from .scheduling_ddpm import DDPMScheduler

SamplerName = Literal["ddpm", "ddim", "dpm-solver", "dpm-solver-sde", "unipc", "euler-ancestral", "pndm", "euler"]
SWEEP_SAMPLERS: tuple[SamplerName, ...] = ("ddpm", "ddim", "dpm-solver", "dpm-solver-sde", "unipc", "euler-ancestral")
SWEEP_STEPS = (5, 10, 20, 50)  # and the model's num_train_timesteps (1000 for the paper's schedule)

# Clip the predicted x_0 to [-1, 1], like DDPMScheduler's clip_sample (the ratio never matters: s is clamped to 1).
_CLIP_X0 = {"thresholding": True, "sample_max_value": 1.0}


@dataclass(frozen=True)
class Sampler:
    """A scheduler class, and the settings it samples a DDPM with."""

    name: str  # what `--scheduler` / `--samplers` call it
    title: str  # how tables and model cards name it
    scheduler_class: type[SchedulerMixin]
    settings: dict[str, Any] = field(default_factory=dict)  # overrides of the DDPM's scheduler config
    method: str = ""  # which algorithm of which paper
    paper: str = ""  # its address

    def make_scheduler(self, config: dict[str, Any]) -> SchedulerMixin:
        """This sampler's scheduler for a model whose DDPM scheduler config is `config`."""
        return self.scheduler_class.from_config(config, **self.settings)


SAMPLERS: dict[str, Sampler] = {sampler.name: sampler for sampler in (
    Sampler("ddpm", "DDPM", DDPMScheduler, {"timestep_spacing": "trailing"},
            "ancestral sampling, Ho et al. 2020 (eq. 6, 11): stochastic, made for all T steps",
            "https://arxiv.org/abs/2006.11239"),
    Sampler("ddim", "DDIM", diffusers.DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": True},
            "DDIM, Song et al. 2021, eta = 0: deterministic first-order steps",
            "https://arxiv.org/abs/2010.02502"),
    Sampler("dpm-solver", "DPM-Solver++(2M)", diffusers.DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True,
             "timestep_spacing": "trailing", **_CLIP_X0},
            "DPM-Solver++(2M), Lu et al. 2022: second-order multistep ODE solver on x_0",
            "https://arxiv.org/abs/2211.01095"),
    Sampler("dpm-solver-sde", "SDE-DPM-Solver++(2M)", diffusers.DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": True,
             "timestep_spacing": "trailing", **_CLIP_X0},
            "SDE-DPM-Solver++(2M), Lu et al. 2022: the same solver on the reverse SDE, fresh noise at every step",
            "https://arxiv.org/abs/2211.01095"),
    Sampler("unipc", "UniPC-2", diffusers.UniPCMultistepScheduler,
            {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
             "timestep_spacing": "trailing", **_CLIP_X0},
            "UniPC-2 (B(h) = e^h - 1), Zhao et al. 2023: multistep predictor-corrector on x_0",
            "https://arxiv.org/abs/2302.04867"),
    Sampler("euler-ancestral", "Euler ancestral", diffusers.EulerAncestralDiscreteScheduler,
            {"timestep_spacing": "trailing"},
            "Euler ancestral, Karras et al. 2022 (k-diffusion): stochastic first-order steps",
            "https://arxiv.org/abs/2206.00364"),
    Sampler("pndm", "PLMS", diffusers.PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "trailing"},
            "PLMS, Liu et al. 2022: fourth-order linear multistep",
            "https://arxiv.org/abs/2202.09778"),
    Sampler("euler", "Euler", diffusers.EulerDiscreteScheduler, {"timestep_spacing": "trailing"},
            "Euler, Karras et al. 2022: deterministic first-order steps",
            "https://arxiv.org/abs/2206.00364"),
)}
assert tuple(SAMPLERS) == get_args(SamplerName)

# The sampler and steps that evaluation uses by default: on the README main job's model at least as good as 1,000 DDPM
# steps (over 5 seed sets), and `ddpm-hf sweep`'s recommendation on its seed set (see README, "Fast sampling").
EVAL_SAMPLER: SamplerName = "dpm-solver-sde"
EVAL_STEPS = 20


def get_sampler(name: str) -> Sampler:
    """The sampler called `name`; a `ValueError` listing the valid names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}: choose from {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


def check_num_steps(steps: int, num_train_timesteps: int) -> None:
    """A `ValueError` unless 1 <= steps <= num_train_timesteps (a sampler visits each training timestep once)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"{steps} steps: the number of sampling steps must be between 1 and the model's "
                         f"num_train_timesteps ({num_train_timesteps}).")


def sweep_steps(num_train_timesteps: int) -> list[int]:
    """The step counts a sweep tries by default: 5, 10, 20, 50 (those below T) and all T training timesteps."""
    return [steps for steps in SWEEP_STEPS if steps < num_train_timesteps] + [num_train_timesteps]
