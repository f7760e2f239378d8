"""The DDPM training losses: MSE to the epsilon, x_0 or v target (optionally with min-SNR-gamma weights), and the
variational-bound term that trains learned variances (the hybrid objective of Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

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


def variational_bound_term(
    scheduler: DDPMScheduler,
    predicted_noise: torch.Tensor,
    predicted_variance: torch.Tensor,
    clean_images: torch.Tensor,
    noisy_images: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """L_t of the variational bound (Ho et al. 2020, eq. 5), per example, in bits per dimension, for a model with
    learned variances (Nichol & Dhariwal 2021, sec. 3.1), as their hybrid objective trains them.

    For t > 0 it is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), for t = 0 the decoder's discretized Gaussian
    negative log-likelihood of x_0 (Ho et al. 2020, eq. 13). p's log-variance interpolates between log beta~_t and
    log beta_t ("learned_range", their eq. 15; log beta~_0 = 0 is replaced by log beta~_1, as in their code); its mean
    comes from `predicted_noise`, which callers detach so that only the variance learns from this term.

    Args:
        predicted_noise, predicted_variance (`torch.Tensor` of shape `(B, C, H, W)`): the UNet's two halves.
        clean_images, noisy_images (`torch.Tensor` of shape `(B, C, H, W)`): x_0 in [-1, 1] and x_t.
        timesteps (`torch.Tensor` of shape `(B,)`): t.
    """
    x0, x_t = clean_images.float(), noisy_images.float()
    alphas_cumprod, betas = scheduler.alphas_cumprod.to(x0.device), scheduler.betas.to(x0.device)
    alpha_bar = alphas_cumprod[timesteps]
    alpha_bar_prev = torch.where(timesteps > 0, alphas_cumprod[(timesteps - 1).clamp(min=0)], 1.0)
    beta = betas[timesteps]
    expand = lambda values: values.reshape(-1, 1, 1, 1)  # noqa: E731  (B,) -> (B, 1, 1, 1)

    # q(x_{t-1} | x_t, x_0) (eq. 6, 7), its variance clipped away from 0 at t = 0.
    posterior_variance = (1 - alphas_cumprod.roll(1)) / (1 - alphas_cumprod) * betas
    posterior_variance[0] = posterior_variance[1]
    log_small = posterior_variance.log()[timesteps]
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    coef_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    true_mean = expand(coef_x0) * x0 + expand(coef_xt) * x_t

    # p(x_{t-1} | x_t): the mean of eq. 11 through x_0 (eq. 15), the learned log-variance.
    predicted_x0 = (x_t - expand((1 - alpha_bar).sqrt()) * predicted_noise.float()) / expand(alpha_bar.sqrt())
    model_mean = expand(coef_x0) * predicted_x0 + expand(coef_xt) * x_t
    fraction = (predicted_variance.float() + 1) / 2
    model_log_variance = fraction * expand(beta.log()) + (1 - fraction) * expand(log_small)

    kl = normal_kl(true_mean, expand(log_small), model_mean, model_log_variance).mean(dim=(1, 2, 3))
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).mean(dim=(1, 2, 3))
    return torch.where(timesteps == 0, nll, kl) / math.log(2.0)


def normal_kl(mean1: torch.Tensor, log_variance1: torch.Tensor, mean2: torch.Tensor,
              log_variance2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_variance1)) || N(mean2, exp(log_variance2))), elementwise, in nats."""
    return 0.5 * (-1.0 + log_variance2 - log_variance1 + torch.exp(log_variance1 - log_variance2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_variance2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2) integrated over each pixel's bin of width
    2/255, the edge bins reaching to -inf and +inf (Ho et al. 2020, eq. 13), elementwise, in nats."""
    inverse_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inverse_std * (x - mean + 1 / 255))
    cdf_minus = torch.special.ndtr(inverse_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_bin = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def training_loss(
    scheduler: DDPMScheduler,
    model_output: torch.Tensor,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    noisy_images: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
    vlb_weight: float = 0.001,
) -> torch.Tensor:
    """The loss of one batch: L_simple (Ho et al. 2020, eq. 14) to the scheduler's target, min-SNR-gamma weighted when
    `snr_gamma` is set; for models with learned variances (`variance_type="learned_range"`), plus `vlb_weight` times
    L_vlb = T E_t[L_t], which trains the variance alone (L_hybrid, Nichol & Dhariwal 2021, sec. 3.1)."""
    learned = scheduler.config.variance_type == "learned_range"
    prediction, predicted_variance = model_output.chunk(2, dim=1) if learned else (model_output, None)
    target = training_target(scheduler, clean_images, noise, timesteps)
    weights = min_snr_weights(scheduler, timesteps, snr_gamma) if snr_gamma else None
    loss = diffusion_loss(prediction, target, weights)
    if learned:
        vlb = variational_bound_term(scheduler, prediction.detach(), predicted_variance, clean_images, noisy_images,
                                     timesteps)
        loss = loss + vlb_weight * scheduler.config.num_train_timesteps * vlb.mean()
    return loss
