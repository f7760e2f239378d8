"""Noise schedulers: DDPM (Ho et al. 2020), drop-in compatible with diffusers."""

from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput"]
