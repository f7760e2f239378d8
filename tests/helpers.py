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


def save_grayscale_pipeline(path, num_train_timesteps: int) -> None:
    """Save an untrained 8 px grayscale pipeline (the shape of the digits) with a short diffusion chain."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=num_train_timesteps)).save_pretrained(path)


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
