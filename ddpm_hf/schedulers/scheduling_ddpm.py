"""The DDPM sampler of Ho et al. 2020, numerically identical to `diffusers.DDPMScheduler` and loadable from its configs.

Equations cite Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (https://arxiv.org/abs/2006.11239), with
alpha_t = 1 - beta_t and alpha_bar_t = prod_{s <= t} alpha_s (`alphas_cumprod`):

    eq. 4    q(x_t | x_0)          = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    eq. 6    q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I)
    eq. 7    mu~_t(x_t, x_0)       = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                                     + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
             beta~_t               = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    eq. 11   mu_theta(x_t, t)      = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t)
    eq. 15   x_0                   ~ (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t)

Timesteps count from 0, as in diffusers: the paper's t = 1..T are 0..T-1 here. When sampling with fewer steps than
training (`set_timesteps`), "t - 1" is the next timestep t' of the schedule and beta_t the beta of that jump,
1 - alpha_bar_t / alpha_bar_t' (diffusers' convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .beta_schedules import BETA_SCHEDULES, rescale_zero_terminal_snr

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"]
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
TimestepSpacing = Literal["linspace", "leading", "trailing"]

Timestep = int | torch.Tensor  # a Python int, or a 0-d (or per-sample (B,)) integer tensor


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """
    Output of [`DDPMScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(B, C, H, W)`):
            x_{t-1}, drawn from p_theta(x_{t-1} | x_t); the next input of the denoising loop.
        pred_original_sample (`torch.Tensor` of shape `(B, C, H, W)`):
            The model's (clipped or thresholded) estimate of x_0, for previews or guidance.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """
    Denoising diffusion probabilistic models (Ho et al. 2020): the forward process q(x_t | x_0) for training
    (`add_noise`) and ancestral sampling of the reverse process (`step`).

    A drop-in replacement for `diffusers.DDPMScheduler`: same config keys, defaults and `scheduler_config.json`, and
    the same numbers for the same inputs and generator. Unlike diffusers', `step` never synchronises host and device
    when given a tensor timestep, so a sampling loop can be captured in a CUDA graph.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T, the length of the forward process.
        beta_start (`float`, defaults to 0.0001): beta_1 of the linear, scaled_linear and sigmoid schedules.
        beta_end (`float`, defaults to 0.02): beta_T of those schedules.
        beta_schedule (`"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`, `"sigmoid"` or `"laplace"`, defaults to
            `"linear"`): how betas go from `beta_start` to `beta_end`; see `beta_schedules.py`.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): explicit betas, overriding `beta_schedule`.
        variance_type (`"fixed_small"`, `"fixed_small_log"`, `"fixed_large"`, `"fixed_large_log"`, `"learned"` or
            `"learned_range"`, defaults to `"fixed_small"`): sigma_t^2 of the reverse step, beta~_t ("small") or
            beta_t ("large") (sec. 3.2), or predicted by the model in extra output channels ("learned": sigma_t^2
            itself; "learned_range": an interpolation between their logs, Nichol & Dhariwal 2021, eq. 15).
        clip_sample (`bool`, defaults to `True`): clip the x_0 prediction to `[-clip_sample_range, clip_sample_range]`.
        prediction_type (`"epsilon"`, `"sample"` or `"v_prediction"`, defaults to `"epsilon"`): what the model
            predicts: the noise (eq. 11), x_0, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho
            2022).
        thresholding (`bool`, defaults to `False`): dynamic thresholding of the x_0 prediction (Saharia et al. 2022);
            takes precedence over `clip_sample`. Not for latent diffusion.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the percentile of |x_0| used as threshold.
        clip_sample_range (`float`, defaults to 1.0): the bound of `clip_sample`.
        sample_max_value (`float`, defaults to 1.0): the largest threshold of dynamic thresholding.
        timestep_spacing (`"linspace"`, `"leading"` or `"trailing"`, defaults to `"leading"`): which timesteps
            `set_timesteps` picks (Lin et al. 2023, Table 2).
        steps_offset (`int`, defaults to 0): added to every timestep of the `"leading"` spacing.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale betas so that alpha_bar_T = 0 (Lin et al. 2023).

    Attributes:
        betas, alphas, alphas_cumprod (`torch.Tensor` of shape `(T,)`): beta_t, alpha_t and alpha_bar_t.
        timesteps (`torch.Tensor`): the timesteps the sampling loop visits, descending; all T until `set_timesteps`.
        num_inference_steps (`int`), custom_timesteps (`bool`): the number of `timesteps` (`None` until
            `set_timesteps`), and whether `set_timesteps` was given them explicitly.
        posterior_mean_coef1, posterior_mean_coef2, posterior_variance, step_betas (`torch.Tensor` of shape `(T,)`):
            for the step from each timestep of `timesteps` to the next: the coefficients of x_0 and x_t in mu~_t,
            beta~_t (eq. 7) and beta_t; NaN at timesteps off the schedule.

    Example:

    ```py
    >>> import torch
    >>> from ddpm_hf import DDPMScheduler

    >>> scheduler = DDPMScheduler(num_train_timesteps=1000)
    >>> x0, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    >>> x_t = scheduler.add_noise(x0, noise, torch.tensor([0, 10, 500, 999]))  # training: q(x_t | x_0)
    >>> scheduler.set_timesteps(50)  # sampling: 50 of the 1000 timesteps
    >>> sample = torch.randn(4, 3, 32, 32)
    >>> for t in scheduler.timesteps:
    ...     sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample  # a real model goes here
    ```
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    # The tensors tabulated over timesteps; they travel together to the device of the samples.
    _tables = ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
               "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "step_betas",
               "_previous_timesteps")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        _check_choice("beta_schedule", beta_schedule, BetaSchedule)
        _check_choice("variance_type", variance_type, VarianceType)
        _check_choice("prediction_type", prediction_type, PredictionType)
        _check_choice("timestep_spacing", timestep_spacing, TimestepSpacing)
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(f"trained_betas has {len(trained_betas)} values but num_train_timesteps is "
                             f"{num_train_timesteps}; give one beta per training timestep.")

        # The forward process: betas, alphas and alpha-bars (eq. 4), computed once.
        if trained_betas is not None:
            self.betas = torch.tensor(trained_betas, dtype=torch.float32)
        else:
            self.betas = BETA_SCHEDULES[beta_schedule](num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()

        self.init_noise_sigma = 1.0  # x_T ~ N(0, I)
        self.one = torch.tensor(1.0)  # alpha_bar before the first timestep (diffusers' name)
        self.num_inference_steps = None
        self.custom_timesteps = False  # whether `set_timesteps` was given the timesteps themselves
        # Until `set_timesteps` is called, sampling visits every training timestep T-1, ..., 0.
        self._set_schedule(torch.arange(num_train_timesteps - 1, -1, -1))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: Timestep | None = None) -> torch.Tensor:
        """Returns `sample` unchanged: DDPM feeds x_t to the model as is (for interchangeability with schedulers that
        scale it)."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """
        Chooses the timesteps the sampling loop visits, and tabulates the reverse-step coefficients (eq. 7) for them.

        Args:
            num_inference_steps (`int`, *optional*): how many of the `num_train_timesteps` timesteps to visit, picked
                by the `timestep_spacing` of the config.
            device (`str` or `torch.device`, *optional*): where to put `timesteps` and the coefficient tables; the
                device of the samples, so that `step` never copies between devices.
            timesteps (`list[int]`, *optional*): the timesteps themselves, strictly descending, in
                `[0, num_train_timesteps)`.

        Raises:
            ValueError: if not exactly one of `num_inference_steps` and `timesteps` is given, or either is invalid.
        """
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass either `num_inference_steps` or `timesteps` to set_timesteps, not both.")
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.int64)
            if timesteps.ndim != 1 or len(timesteps) == 0:
                raise ValueError(f"`timesteps` must be a non-empty list of integers, got {timesteps.tolist()}.")
            if np.any(np.diff(timesteps) >= 0):
                raise ValueError(f"`timesteps` must be strictly descending, got {timesteps.tolist()}.")
            if timesteps[0] >= T or timesteps[-1] < 0:
                raise ValueError(f"`timesteps` must lie in [0, num_train_timesteps={T}), got {timesteps.tolist()}.")
        elif num_inference_steps is not None:
            if not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, "
                                 f"got {num_inference_steps}.")
            offset = self.config.steps_offset
            timesteps = _spaced_timesteps(self.config.timestep_spacing, num_inference_steps, T, offset)
            if timesteps[0] >= T:
                raise ValueError(f"With steps_offset={offset}, {num_inference_steps} steps start at timestep "
                                 f"{timesteps[0]}, past num_train_timesteps - 1 = {T - 1}; use fewer steps.")
        else:
            raise ValueError("set_timesteps needs `num_inference_steps` or `timesteps`; got neither.")

        self.num_inference_steps = len(timesteps)
        self.custom_timesteps = num_inference_steps is None
        self._set_schedule(torch.from_numpy(timesteps))
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self._move_tables(torch.device(device))

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        """Sets `timesteps` (descending) and tabulates, by timestep, eq. 7 for the step from each to the next one."""
        T = self.config.num_train_timesteps
        t = timesteps.to(self.alphas_cumprod.device)
        # Per step of the schedule, t -> t-1 (the next timestep), in the same operations (and roundings) as diffusers:
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = torch.cat([alpha_bar[1:], alpha_bar.new_ones(1)])  # alpha_bar_{t-1}; 1 at x_0
        beta = 1 - alpha_bar / alpha_bar_prev  # beta_t of this step; betas[t] when no timestep is skipped
        coef1 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)  # eq. 7, x_0's coefficient in mu~_t
        coef2 = (alpha_bar / alpha_bar_prev) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)  # eq. 7, x_t's
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta  # eq. 7, beta~_t

        self.timesteps = timesteps
        self._scheduled = frozenset(timesteps.tolist())  # checks Python-int timesteps without touching the device
        self.posterior_mean_coef1 = _by_timestep(coef1, t, T)
        self.posterior_mean_coef2 = _by_timestep(coef2, t, T)
        self.posterior_variance = _by_timestep(variance.clamp(min=1e-20), t, T)  # clamped: its log stays finite
        self.step_betas = _by_timestep(beta, t, T)
        self._previous_timesteps = _by_timestep(torch.cat([t[1:], t.new_tensor([-1])]), t, T, fill=-1)

    def _move_tables(self, device: torch.device) -> None:
        """Moves every table to `device` (once: a no-op when they are there already)."""
        if self.alphas_cumprod.device != device:
            for name in self._tables:
                setattr(self, name, getattr(self, name).to(device))

    def previous_timestep(self, timestep: Timestep) -> Timestep:
        """The timestep the step from `timestep` goes to: the next one of `timesteps`, or -1 after the last."""
        self._check_scheduled(timestep)
        if torch.is_tensor(timestep):
            return self._previous_timesteps.to(timestep.device)[_as_index(timestep)].reshape(timestep.shape)
        return int(self._previous_timesteps[timestep])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        Samples x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4), given the noise.

        Args:
            original_samples (`torch.Tensor` of shape `(B, C, H, W)`): x_0.
            noise (`torch.Tensor` of shape `(B, C, H, W)`): eps ~ N(0, I).
            timesteps (`torch.Tensor` of shape `(B,)` or `()`): t, one per sample or one for all.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
        """
        x0, t = original_samples, _as_index(timesteps)
        self._move_tables(x0.device)
        sqrt_alpha_bar = _expand(self.sqrt_alphas_cumprod[t], x0)
        sqrt_one_minus_alpha_bar = _expand(self.sqrt_one_minus_alphas_cumprod[t], x0)
        return sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4).

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): x_0.
            noise (`torch.Tensor` of shape `(B, C, H, W)`): eps.
            timesteps (`torch.Tensor` of shape `(B,)` or `()`): t.
        """
        x0, t = sample, _as_index(timesteps)
        self._move_tables(x0.device)
        sqrt_alpha_bar = _expand(self.sqrt_alphas_cumprod[t], x0)
        sqrt_one_minus_alpha_bar = _expand(self.sqrt_one_minus_alphas_cumprod[t], x0)
        return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """
        One reverse step: draws x_{t-1} ~ p_theta(x_{t-1} | x_t) = N(mu~_t(x_t, x_0), sigma_t^2 I), with x_0 predicted
        by the model (Ho et al. 2020, Algorithm 2).

        Host-device synchronisation: a tensor `timestep` only indexes the coefficient tables, so nothing is read back
        to the host. At the last step (t = 0) no noise is added (Algorithm 2): a Python int `timestep` skips the draw,
        as diffusers does; a tensor one draws it and multiplies it by (t > 0) instead of branching on its value. The
        result is the same; only the generator advances one draw further. Call `set_timesteps(..., device=...)` first
        so that the tables already live on the samples' device.

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`, or `(B, 2C, H, W)` for learned variances): the
                model's prediction at x_t (eps, x_0 or v, per `prediction_type`), then its variance channels.
            timestep (`int` or `torch.Tensor`): t, one of `timesteps`.
            sample (`torch.Tensor` of shape `(B, C, H, W)`): x_t.
            generator (`torch.Generator` or a list of B of them, *optional*): for the noise z.
            return_dict (`bool`, defaults to `True`): return a [`DDPMSchedulerOutput`] rather than a tuple.

        Returns:
            [`DDPMSchedulerOutput`] or `(prev_sample, pred_original_sample)`.
        """
        self._check_step_inputs(model_output, timestep, sample)
        t = _as_index(timestep)
        self._move_tables(sample.device)

        # 1. Split off the variance channels of learned-variance models (Nichol & Dhariwal 2021).
        predicted_variance = None
        if self.config.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)

        # 2. Predict x_0: from eps by inverting eq. 4 (eq. 15); as is; or from v = sqrt(alpha_bar) eps -
        #    sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022).
        sqrt_alpha_bar = _expand(self.sqrt_alphas_cumprod[t], sample)
        sqrt_one_minus_alpha_bar = _expand(self.sqrt_one_minus_alphas_cumprod[t], sample)
        if self.config.prediction_type == "epsilon":
            pred_original_sample = (sample - sqrt_one_minus_alpha_bar * model_output) / sqrt_alpha_bar
        elif self.config.prediction_type == "sample":
            pred_original_sample = model_output
        else:  # "v_prediction"
            pred_original_sample = sqrt_alpha_bar * sample - sqrt_one_minus_alpha_bar * model_output

        # 3. Keep x_0 in the data range: dynamic thresholding, or clipping (Algorithm 2 does neither).
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-r, r)

        # 4. The mean of x_{t-1}: the posterior mean mu~_t(x_t, x_0) (eq. 7). With an eps-model and no clipping this
        #    is exactly the mean mu_theta(x_t, t) of eq. 11.
        prev_sample = (_expand(self.posterior_mean_coef1[t], sample) * pred_original_sample
                       + _expand(self.posterior_mean_coef2[t], sample) * sample)

        # 5. Sample x_{t-1} = mean + sigma_t z, z ~ N(0, I) (eq. 6; Algorithm 2, lines 3-4), with z = 0 at t = 0.
        if torch.is_tensor(t) or t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            noise = self._sigma(t, predicted_variance, sample) * noise
            if torch.is_tensor(t):
                noise = noise * _expand(t > 0, sample)  # a mask, not a branch: no device sync
            prev_sample = prev_sample + noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    @property
    def variance_type(self) -> str:
        """The config's `variance_type` (read-only here: `step` and `_get_variance` follow the config)."""
        return self.config.variance_type

    def _get_variance(
        self,
        t: Timestep,
        predicted_variance: torch.Tensor | None = None,
        variance_type: VarianceType | None = None,
    ) -> torch.Tensor:
        """
        The variance quantity of the step from `t`, as `diffusers.DDPMScheduler._get_variance` returns it: beta~_t
        (`"fixed_small"`, clamped at 1e-20 as its log is taken), its square root (`"fixed_small_log"`), beta_t
        (`"fixed_large"`), log(beta_t) (`"fixed_large_log"`), the model's prediction (`"learned"`), or the log-variance
        interpolated from it (`"learned_range"`, Nichol & Dhariwal 2021, eq. 15).

        Args:
            t (`int` or `torch.Tensor`): a timestep of the schedule (or one per sample).
            predicted_variance (`torch.Tensor`, *optional*): the model's variance channels, for the learned types.
            variance_type (`str`, *optional*): defaults to the config's.
        """
        self._check_scheduled(t)
        index = _as_index(t)
        shape = t.shape if torch.is_tensor(t) else ()
        small, large = self.posterior_variance[index].reshape(shape), self.step_betas[index].reshape(shape)
        variance_type = variance_type or self.config.variance_type
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            small, large = _expand(small, predicted_variance), _expand(large, predicted_variance)
            frac = (predicted_variance + 1) / 2
            return frac * large.log() + (1 - frac) * small.log()
        return {
            "fixed_small": lambda: small,
            "fixed_small_log": lambda: torch.exp(0.5 * small.log()),
            "fixed_large": lambda: large,
            "fixed_large_log": lambda: large.log(),
        }[variance_type]()

    def _sigma(self, t: Timestep, predicted_variance: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """sigma_t of the reverse step: sqrt(beta~_t) ("small") or sqrt(beta_t) ("large") (sec. 3.2), or learned."""
        variance_type = self.config.variance_type
        # diffusers 0.42 takes sqrt(log(beta_t)) for "fixed_large_log" (NaN); we give it the sigma it means,
        # sqrt(beta_t), exactly as "fixed_large".
        variance = self._get_variance(t, predicted_variance,
                                      "fixed_large" if variance_type == "fixed_large_log" else variance_type)
        if variance_type not in ("learned", "learned_range"):  # per timestep, not already per pixel
            variance = _expand(variance, x)
        if variance_type == "fixed_small_log":  # already a standard deviation
            return variance
        if variance_type == "learned_range":  # a log-variance
            return torch.exp(0.5 * variance)
        return variance**0.5

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): s = the `dynamic_thresholding_ratio` percentile of
        |x_0| per sample, clamped to [1, sample_max_value]; x_0 is clamped to [-s, s] and divided by s."""
        batch_size, dtype = sample.shape[0], sample.dtype
        flat = sample.reshape(batch_size, -1)  # (B, C*H*W)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32 or float64
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)  # (B, 1)
        return (flat.clamp(-s, s) / s).reshape(sample.shape).to(dtype)

    def _check_scheduled(self, timestep: Timestep) -> None:
        """Rejects a non-integer timestep, and a Python-int one outside the schedule. (Tensor values are not checked,
        to stay on the device; off-schedule tensor timesteps give NaN.)"""
        if isinstance(timestep, float) or torch.is_tensor(timestep) and timestep.is_floating_point():
            raise ValueError(f"Timesteps index the training schedule and are integers, got {timestep!r}; step "
                             "through `scheduler.timesteps`.")
        if not torch.is_tensor(timestep) and timestep not in self._scheduled:
            raise ValueError(f"Timestep {timestep} is not in the schedule ({len(self.timesteps)} timesteps from "
                             f"{int(self.timesteps[0])} to {int(self.timesteps[-1])}); step through "
                             f"`scheduler.timesteps`, or call `set_timesteps` first.")

    def _check_step_inputs(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor) -> None:
        """Shape checks for `step`: model_output matches sample, with twice the channels for learned variances."""
        self._check_scheduled(timestep)
        learned = self.config.variance_type in ("learned", "learned_range")
        expected = (sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]) if learned else tuple(sample.shape)
        if tuple(model_output.shape) != expected:
            why = (f"variance_type={self.config.variance_type!r} needs the prediction and the variance, twice the "
                   "channels of the sample" if learned else "it must match the sample")
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} for a sample of shape "
                             f"{tuple(sample.shape)}; expected {expected}: {why}.")


def _expand(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values of shape () or (B,) as (1 or B, 1, 1, 1), to broadcast against x (B, C, H, W), in x's dtype."""
    return values.to(device=x.device, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def _as_index(timestep: Timestep) -> Timestep:
    """A tensor timestep as a 1-D index: tables indexed by a 0-d tensor would read it back to the host as an int."""
    return timestep.reshape(-1) if torch.is_tensor(timestep) else timestep


def _by_timestep(values: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int,
                 fill: float = float("nan")) -> torch.Tensor:
    """A (T,) table holding values[i] at index timesteps[i], and `fill` at timesteps off the schedule."""
    return values.new_full((num_train_timesteps,), fill).index_copy(0, timesteps, values)


def _spaced_timesteps(spacing: TimestepSpacing, n: int, T: int, steps_offset: int) -> np.ndarray:
    """n of the T training timesteps, descending, spaced as in Lin et al. 2023, Table 2 (and as diffusers does)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        # diffusers applies `steps_offset` to this spacing only; so do we.
        return (np.arange(n) * (T // n))[::-1].astype(np.int64) + steps_offset
    # "trailing". For some n (61, 103, ... of 1000) rounding makes diffusers' arange one longer, ending in a
    # timestep -1; we keep its first n values.
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64)[:n] - 1


def _check_choice(name: str, value: str, options: object) -> None:
    """Raises a ValueError listing the valid values if `value` is not one of the `Literal` `options`."""
    if value not in get_args(options):
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, get_args(options)))}.")
