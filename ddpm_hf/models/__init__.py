"""The DDPM UNet and its building blocks, with diffusers' weight names and config keys."""

from .attention import SpatialSelfAttention, convert_legacy_attention_keys
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, get_timestep_embedding
from .resnet import Downsample2D, FirDownsample2D, FirUpsample2D, ResnetBlock2D, Upsample2D
from .unet_2d import UNet2DModel, UNet2DOutput
from .unet_2d_blocks import (
    DOWN_BLOCKS,
    UP_BLOCKS,
    AttnDownBlock2D,
    AttnSkipDownBlock2D,
    AttnSkipUpBlock2D,
    AttnUpBlock2D,
    BlockOptions,
    DownBlock2D,
    ResnetDownsampleBlock2D,
    ResnetUpsampleBlock2D,
    SkipDownBlock2D,
    SkipUpBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
)

__all__ = [
    "AttnDownBlock2D",
    "AttnSkipDownBlock2D",
    "AttnSkipUpBlock2D",
    "AttnUpBlock2D",
    "BlockOptions",
    "DOWN_BLOCKS",
    "DownBlock2D",
    "Downsample2D",
    "FirDownsample2D",
    "FirUpsample2D",
    "GaussianFourierProjection",
    "ResnetBlock2D",
    "ResnetDownsampleBlock2D",
    "ResnetUpsampleBlock2D",
    "SkipDownBlock2D",
    "SkipUpBlock2D",
    "SpatialSelfAttention",
    "TimestepEmbedding",
    "Timesteps",
    "UNet2DModel",
    "UNet2DOutput",
    "UNetMidBlock2D",
    "UP_BLOCKS",
    "UpBlock2D",
    "Upsample2D",
    "convert_legacy_attention_keys",
    "get_timestep_embedding",
]
