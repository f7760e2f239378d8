"""ddpm_hf: a from-scratch DDPM that is drop-in compatible with Hugging Face diffusers."""

from .models import UNet2DModel
from .pipelines import DDPMPipeline
from .schedulers import DDPMScheduler

__version__ = "0.1.0"

__all__ = ["DDPMPipeline", "DDPMScheduler", "UNet2DModel"]
