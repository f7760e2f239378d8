"""The time-conditioned ResNet block and the 2x resamplers the UNet is built from."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# `act_fn` values accepted in a diffusers config ("swish" is SiLU's older name).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def upsample_nearest_2x(hidden_states: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, C, 2H, 2W)` by repeating each pixel, in the input's memory format."""
    if hidden_states.device.type == "cpu" and hidden_states.is_contiguous():
        # PyTorch's CPU nearest-neighbour kernel is far faster on NHWC than on NCHW (0.12 vs 3.4 ms for a
        # 16x64x16x16 tensor on 2 cores): interpolate in NHWC, then come back to NCHW. Same values.
        hidden_states = hidden_states.contiguous(memory_format=torch.channels_last)
        return F.interpolate(hidden_states, scale_factor=2.0, mode="nearest").contiguous()
    return F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")


class UpsampleNearest2x(nn.Module):
    """[`upsample_nearest_2x`] as a module."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return upsample_nearest_2x(hidden_states)


class _FirFilter2D(nn.Module):
    """Holds the separable [1, 3, 3, 1] FIR filter (a non-persistent buffer: no weight name, moves with the model)."""

    def __init__(self, gain: float):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", torch.outer(taps, taps) * (gain / taps.sum() ** 2), persistent=False)

    def _depthwise_kernel(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The filter once per channel, `(C, 1, 4, 4)`, in the input's dtype."""
        return self.kernel.to(hidden_states.dtype).expand(hidden_states.shape[1], 1, 4, 4)


class FirDownsample2D(_FirFilter2D):
    """Halves height and width with the [1, 3, 3, 1] low-pass FIR filter, no weights (NCSN++, Song et al. 2021).

    The anti-aliased downsampling of StyleGAN2's `upfirdn2d` with `down=2`: each output pixel is a weighted average
    of a 4x4 window (zero padding of one pixel), computed as a depthwise strided convolution.
    """

    def __init__(self):
        super().__init__(gain=1.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return F.conv2d(hidden_states, self._depthwise_kernel(hidden_states), stride=2, padding=1,
                        groups=hidden_states.shape[1])


class FirUpsample2D(_FirFilter2D):
    """Doubles height and width with the [1, 3, 3, 1] FIR filter, no weights (NCSN++, Song et al. 2021).

    StyleGAN2's `upfirdn2d` with `up=2`: zeros between the pixels, then the filter with gain 4 (so that a constant
    image stays constant), computed as a depthwise transposed convolution.
    """

    def __init__(self):
        super().__init__(gain=4.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return F.conv_transpose2d(hidden_states, self._depthwise_kernel(hidden_states), stride=2, padding=1,
                                  groups=hidden_states.shape[1])


# Parameter-free 2x resampling inside a ResnetBlock2D (so it adds no weight names): box filter / nearest neighbour
# (BigGAN), or the FIR filter (NCSN++).
Resample = Literal["down", "up", "fir_down", "fir_up"]
_RESAMPLERS = {
    "down": lambda: nn.AvgPool2d(kernel_size=2),
    "up": UpsampleNearest2x,
    "fir_down": FirDownsample2D,
    "fir_up": FirUpsample2D,
}


class Downsample2D(nn.Module):
    """Halves height and width with a stride-2 3x3 convolution.

    Args:
        channels (`int`): Input and output channels.
        padding (`int`, defaults to 1): Convolution padding. 0 pads only the bottom and right edge by one
            pixel instead, which is TensorFlow's "SAME" padding used by the original DDPM checkpoints.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """`temb` is ignored; it is accepted so that blocks call every resampler the same way."""
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Doubles height and width: nearest-neighbour interpolation, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """`temb` is ignored; it is accepted so that blocks call every resampler the same way."""
        return self.conv(upsample_nearest_2x(hidden_states))


class ResnetBlock2D(nn.Module):
    """Pre-activation ResNet block conditioned on the timestep embedding (Ho et al. 2020, appendix B).

    `norm1 -> act -> [resample] -> conv1 -> (+ time) -> norm2 -> act -> dropout -> conv2`, added to a
    shortcut that is resampled too and projected by a 1x1 convolution when the channel count changes.

    Args:
        in_channels (`int`): Input channels.
        out_channels (`int`): Output channels.
        temb_channels (`int`): Size of the timestep embedding.
        groups (`int`, defaults to 32): GroupNorm groups of `norm1`; must divide `in_channels`.
        groups_out (`int`, *optional*): GroupNorm groups of `norm2`; must divide `out_channels`. Defaults to `groups`.
        eps (`float`, defaults to 1e-6): GroupNorm epsilon.
        act_fn (`str`, defaults to `"silu"`): A key of `ACTIVATIONS`.
        dropout (`float`, defaults to 0.0): Dropout before `conv2`.
        time_embedding_norm (`"default"` or `"scale_shift"`): `"default"` adds the projected embedding
            before `norm2`; `"scale_shift"` applies it after `norm2` as a FiLM scale and shift
            (Dhariwal & Nichol 2021), so `time_emb_proj` predicts twice the channels.
        output_scale_factor (`float`, defaults to 1.0): The residual sum is divided by this.
        resample (`"down"`, `"up"`, `"fir_down"`, `"fir_up"` or `None`): 2x resampling of both paths right after
            the first activation: average pooling or nearest upsampling, as in BigGAN's residual blocks, or the FIR
            filter of NCSN++ ([`FirDownsample2D`], [`FirUpsample2D`]).
        use_in_shortcut (`bool`, *optional*): Project the shortcut with a 1x1 convolution; by default only when
            the channel count changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        act_fn: str = "silu",
        dropout: float = 0.0,
        time_embedding_norm: Literal["default", "scale_shift"] = "default",
        output_scale_factor: float = 1.0,
        resample: Resample | None = None,
        use_in_shortcut: bool | None = None,
    ):
        super().__init__()
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        time_channels = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, time_channels)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = ACTIVATIONS[act_fn]()
        self.resample = _RESAMPLERS[resample]() if resample else None
        self.conv_shortcut = None
        if in_channels != out_channels if use_in_shortcut is None else use_in_shortcut:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Maps `(B, in_channels, H, W)` and a `(B, temb_channels)` embedding to `(B, out_channels, H', W')`."""
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.resample is not None:
            hidden_states, input_tensor = self.resample(hidden_states), self.resample(input_tensor)
        hidden_states = self.conv1(hidden_states)

        time = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # (B, C_time, 1, 1)
        if self.time_embedding_norm == "scale_shift":
            scale, shift = time.chunk(2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + scale) + shift
        else:
            hidden_states = self.norm2(hidden_states + time)

        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        hidden_states = input_tensor + hidden_states
        return hidden_states if self.output_scale_factor == 1 else hidden_states / self.output_scale_factor
