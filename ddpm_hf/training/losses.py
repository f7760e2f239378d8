"""The DDPM training loss: MSE to the epsilon, x_0 or v target, optionally with min-SNR-gamma weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..schedulers import DDPMScheduler


def training_target(
    scheduler: DDPMScheduler, clean_images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict from x_t: the noise (Ho et al. 2020, eq. 14), x_0, or v (Salimans & Ho 2022)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean_images
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean_images, noise, timesteps)
    raise ValueError(f"Unknown prediction_type {prediction_type!r}: use epsilon, sample or v_prediction.")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-example loss weights min(SNR_t, gamma) / SNR_t rewritten for the target (Hang et al. 2023, sec. 3.4).

    With SNR_t = alphas_cumprod_t / (1 - alphas_cumprod_t): the weight on the x_0 error is min(SNR_t, gamma);
    an epsilon error is SNR_t times an x_0 error and a v error SNR_t + 1 times, so those are divided out.
    """
    snr = compute_snr(scheduler, timesteps)  # (B,)
    clipped = snr.clamp(max=snr_gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over pixels, then a (weighted) mean over the batch, computed in float32."""
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if weights is None:
        return per_example.mean()
    return (per_example * weights).mean()
