"""Small builders shared by the pipeline and checkpoint tests."""

import diffusers
import numpy as np
import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel


def make_pipeline(config: dict, seed: int = 0, **scheduler_kwargs) -> DDPMPipeline:
    torch.manual_seed(seed)
    pipe = DDPMPipeline(unet=UNet2DModel(**config).eval(), scheduler=DDPMScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_diffusers(pipe: DDPMPipeline) -> diffusers.DDPMPipeline:
    """The same weights and scheduler config in diffusers' own classes."""
    unet = diffusers.UNet2DModel.from_config(pipe.unet.config).eval()
    unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    reference = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler.from_config(pipe.scheduler.config))
    reference.set_progress_bar_config(disable=True)
    return reference


def sample(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 20)
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
