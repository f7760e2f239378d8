"""Small builders and reference configs shared by the tests."""

import diffusers
import numpy as np
import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel

# google/ddpm-cifar10-32, the DDPM paper's CIFAR-10 network, in its config.json spelling.
CIFAR10_CONFIG = dict(
    sample_size=32,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
)
CIFAR10_NUM_PARAMETERS = 35_746_307


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
