"""Timestep embeddings: a fixed projection of t (sinusoidal or Gaussian Fourier), then a small MLP."""

import math

import torch
from torch import nn


def get_timestep_embedding(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and DDPM.

    Frequency `i` is `max_period ** (-i / (embedding_dim // 2 - downscale_freq_shift))`.

    Args:
        timesteps (`torch.Tensor` of shape `(N,)`): One timestep per sample.
        embedding_dim (`int`): Size of the embedding; an odd size is zero-padded.
        flip_sin_to_cos (`bool`): Put the cosines first (`[cos, sin]`) instead of `[sin, cos]`.
        downscale_freq_shift (`float`): 1 reproduces the original DDPM code, 0 the Transformer.
        max_period (`int`): Period of the slowest frequency.

    Returns:
        `torch.Tensor` of shape `(N, embedding_dim)`, always float32.
    """
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half_dim, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half_dim - downscale_freq_shift))  # (D/2,)
    angles = timesteps[:, None].float() * frequencies[None, :]  # (N, D/2)
    sin_cos = (angles.sin(), angles.cos())
    embedding = torch.cat(sin_cos[::-1] if flip_sin_to_cos else sin_cos, dim=-1)  # (N, 2 * D/2)
    return nn.functional.pad(embedding, (0, embedding_dim % 2))


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection of timesteps (see [`get_timestep_embedding`])."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, num_channels)
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of log(sigma), for noise-level conditioned (score SDE) models.

    Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix H. The frequencies are
    drawn once and frozen, but stored as the parameter `weight` so they travel with the checkpoint.
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, sigmas: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, 2 * embedding_size)
        # Same operation order as diffusers: sin() of these large angles amplifies rounding differences.
        angles = torch.log(sigmas)[:, None] * self.weight[None, :].float() * 2 * math.pi
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP that turns the fixed timestep projection into the embedding every ResNet block reads."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:  # (N, in_channels) -> (N, time_embed_dim)
        return self.linear_2(self.act(self.linear_1(sample)))
