"""Noise schedules beta_1..beta_T, bit-identical to the ones in diffusers (all float32)."""

from __future__ import annotations

import math
from typing import Callable

import torch


def linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020, sec. 4: 1e-4 to 0.02)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Square roots of the betas evenly spaced, then squared (the Latent/Stable Diffusion schedule)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def sigmoid(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """A sigmoid on [-6, 6] rescaled to [beta_start, beta_end] (the GeoDiff schedule, Xu et al. 2022)."""
    return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start


def squaredcos_cap_v2(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The cosine schedule alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008 (Nichol & Dhariwal 2021, eq. 17).

    `beta_start` and `beta_end` are ignored, as in diffusers.
    """
    return betas_for_alpha_bar(num_train_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


def laplace(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The Laplace schedule of Hang et al. 2024 (arXiv:2407.03297), written exactly as diffusers writes it.

    `beta_start` and `beta_end` are ignored, as in diffusers.
    """

    def alpha_bar(t: float) -> float:
        log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(log_snr)
        return math.sqrt(snr / (1 + snr))

    return betas_for_alpha_bar(num_train_timesteps, alpha_bar)


def betas_for_alpha_bar(
    num_train_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """Discretises a continuous alpha_bar(t), t in [0, 1]: beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at
    `max_beta` (Nichol & Dhariwal 2021, sec. 3.2). Computed in float64, returned as float32."""
    T = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shifts and scales sqrt(alpha_bar) so that alpha_bar_T = 0, i.e. zero SNR at the last timestep
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod -= last  # the last timestep goes to zero ...
    sqrt_alphas_cumprod *= first / (first - last)  # ... and the first one keeps its value
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[0:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])  # undo the cumprod
    return 1 - alphas


# Every `beta_schedule` the scheduler accepts, by its diffusers config name. All share one signature.
BETA_SCHEDULES: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "squaredcos_cap_v2": squaredcos_cap_v2,
    "sigmoid": sigmoid,
    "laplace": laplace,
}
