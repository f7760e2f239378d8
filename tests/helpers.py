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

# diffusers' examples/unconditional_image_generation/train_unconditional.py (run at 32 px to stay quick).
TRAIN_UNCONDITIONAL_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)


def tiny(**overrides) -> dict:
    """A two-stage UNet with attention in the lower stage, small enough to run in milliseconds."""
    config = dict(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    return config | overrides


TINY_CONFIGS = {
    "default": tiny(),
    "one attention head": tiny(attention_head_dim=None),
    "fourier time": tiny(time_embedding_type="fourier"),
    "learned time": tiny(time_embedding_type="learned", num_train_timesteps=50),
    "scale_shift": tiny(resnet_time_scale_shift="scale_shift"),
    "scale_shift, mid attention norm": tiny(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4),
    "resnet resamplers": tiny(
        block_out_channels=(8, 16, 16),
        down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D", "DownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
    ),
    "class table, centered input": tiny(num_class_embeds=10, center_input_sample=True),
    "class timestep": tiny(class_embed_type="timestep"),
    "class identity": tiny(class_embed_type="identity"),
    "no mid attention": tiny(add_attention=False),
    "no mid block": tiny(mid_block_type=None),
    "dropout, eval mode": tiny(dropout=0.5),
    "non-square": tiny(sample_size=(8, 16)),
    "assorted options": tiny(
        in_channels=1,
        out_channels=2,
        layers_per_block=2,
        downsample_padding=0,
        mid_block_scale_factor=2**0.5,
        act_fn="mish",
        time_embedding_dim=24,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        attention_head_dim=4,
    ),
}


# The NCSN++ (score SDE) family, at small widths: the image path, FIR resampling, NCSN++ normalization.
NCSNPP_CONFIGS = {
    # diffusers' own NCSN++ test network (tests/models/unets/test_models_unet_2d.py), at 16 px.
    "diffusers test network": dict(
        sample_size=16,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        time_embedding_type="fourier",
        norm_eps=1e-6,
        mid_block_scale_factor=2**0.5,
        norm_num_groups=None,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ),
    # google/ncsnpp-celebahq-256's layout (7 stages, attention at 16 px of 256), 8x narrower, one layer per block.
    "ncsnpp-celebahq-256, narrow": dict(
        sample_size=64,
        block_out_channels=(32, 32, 32, 32, 32, 32, 32),
        layers_per_block=1,
        attention_head_dim=None,
        time_embedding_type="fourier",
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_eps=1e-6,
        mid_block_scale_factor=1.41421356237,
        norm_num_groups=None,
        down_block_types=("SkipDownBlock2D",) * 4 + ("AttnSkipDownBlock2D",) + ("SkipDownBlock2D",) * 2,
        up_block_types=("SkipUpBlock2D",) * 2 + ("AttnSkipUpBlock2D",) + ("SkipUpBlock2D",) * 4,
    ),
    # diffusers' consistency-distillation example: NCSN++ blocks with sinusoidal time and 32-group norms elsewhere.
    "consistency-models example": dict(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_head_dim=8,
        center_input_sample=True,
        mid_block_scale_factor=2**0.5,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ),
    "scale_shift, dropout": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=None,
        resnet_time_scale_shift="scale_shift",
        dropout=0.3,
        down_block_types=("AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D"),
    ),
    "image path in and out only": tiny(
        block_out_channels=(32, 32, 32),
        down_block_types=("SkipDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "SkipUpBlock2D"),
    ),
}

# diffusers' DDPMPipeline test network (tests/pipelines/ddpm/test_ddpm.py): attention only at 8 channels, with
# the default attention_head_dim=8, which would not fit the 4-channel level (that does not attend).
DDPM_PIPELINE_TEST_CONFIG = dict(
    sample_size=8,
    block_out_channels=(4, 8),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)

# Every config the UNet parity tests build, by name.
PARITY_CONFIGS = {
    **TINY_CONFIGS,
    **{f"NCSN++: {name}": config for name, config in NCSNPP_CONFIGS.items()},
    "DDPMPipeline test network": DDPM_PIPELINE_TEST_CONFIG,
    "UNetRes block names": tiny(
        down_block_types=("UNetResDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UNetResUpBlock2D")
    ),
    "attention_head_dim only where attended": tiny(
        block_out_channels=(8, 32), norm_num_groups=8, attention_head_dim=16, downsample_type="fir"
    ),
}


def make_inputs(config: dict, batch_size: int = 2, seed: int = 0) -> dict:
    """Random forward() arguments for a model with `config`: sample, per-sample timesteps, class labels."""
    generator = torch.Generator().manual_seed(seed)
    height, width = (config["sample_size"],) * 2 if isinstance(config["sample_size"], int) else config["sample_size"]
    sample = torch.randn(batch_size, config.get("in_channels", 3), height, width, generator=generator)
    if config.get("time_embedding_type") == "fourier":
        timestep = 0.01 + 50 * torch.rand(batch_size, generator=generator)  # noise levels sigma
    else:
        timestep = torch.randint(0, config.get("num_train_timesteps") or 1000, (batch_size,), generator=generator)

    class_labels = None
    if config.get("class_embed_type") == "identity":
        time_embed_dim = config.get("time_embedding_dim") or 4 * config["block_out_channels"][0]
        class_labels = torch.randn(batch_size, time_embed_dim, generator=generator)
    elif config.get("class_embed_type") == "timestep" or config.get("num_class_embeds"):
        class_labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return dict(sample=sample, timestep=timestep, class_labels=class_labels)


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
