"""The stages of the UNet: encoder (down) blocks, the middle block and decoder (up) blocks.

Every block is a stack of "layers" (a `ResnetBlock2D`, optionally followed by a `SpatialSelfAttention`)
plus at most one resampler. The block classes differ only in whether they attend and which resampler
they use; `BlockOptions` carries everything else, so all down blocks share one constructor signature and
all up blocks another, and `DOWN_BLOCKS` / `UP_BLOCKS` map diffusers' block names to them.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SpatialSelfAttention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclass(frozen=True)
class BlockOptions:
    """Settings shared by every block of one UNet, fixed once from its config."""

    temb_channels: int  # size of the timestep embedding each ResNet block reads
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    dropout: float = 0.0
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    attention_head_dim: int | None = 8  # None: one head as wide as the block
    downsample_padding: int = 1  # 0: TF "SAME" padding of the original DDPM checkpoints
    # Resampler of the Attn* blocks; the other blocks' resampler is fixed by their name, as in diffusers.
    downsample_type: Literal["conv", "resnet"] = "conv"
    upsample_type: Literal["conv", "resnet"] = "conv"

    def resnet(
        self,
        in_channels: int,
        out_channels: int,
        resample: Literal["down", "up"] | None = None,
        output_scale_factor: float = 1.0,
    ) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels,
            out_channels,
            self.temb_channels,
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            act_fn=self.act_fn,
            dropout=self.dropout,
            time_embedding_norm=self.resnet_time_scale_shift,
            output_scale_factor=output_scale_factor,
            resample=resample,
        )

    def attention(self, channels: int) -> SpatialSelfAttention:
        return SpatialSelfAttention(channels, self.attention_head_dim, self.norm_num_groups, self.norm_eps)

    def downsampler(self, channels: int, kind: Literal["conv", "resnet"]) -> nn.Module:
        if kind == "resnet":
            return self.resnet(channels, channels, resample="down")
        return Downsample2D(channels, padding=self.downsample_padding)

    def upsampler(self, channels: int, kind: Literal["conv", "resnet"]) -> nn.Module:
        if kind == "resnet":
            return self.resnet(channels, channels, resample="up")
        return Upsample2D(channels)


def _checkpoint(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(module, *args, use_reentrant=False)


class _LayerStack(nn.Module):
    """ResNet blocks, each optionally followed by self-attention; handles gradient checkpointing."""

    def __init__(self, resnets: list[ResnetBlock2D], attentions: list[SpatialSelfAttention] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        # diffusers' ModelMixin.enable_gradient_checkpointing() sets both attributes on every module that has them.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = _checkpoint

    def _layer(self, index: int, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """ResNet block `index`, then its attention if this block attends."""
        hidden_states = self._call(self.resnets[index], hidden_states, temb)
        if self.attentions is not None:
            hidden_states = self._call(self.attentions[index], hidden_states)
        return hidden_states

    def _call(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """`module(*args)`, recomputed during backward instead of stored when checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


class DownBlock2D(_LayerStack):
    """Encoder stage: `num_layers` ResNet blocks, then a strided-convolution downsampler.

    Args:
        in_channels (`int`): Channels of the input.
        out_channels (`int`): Channels of every layer and of the output.
        num_layers (`int`): Number of ResNet blocks.
        add_downsample (`bool`): Whether to halve the resolution at the end (not in the last stage).
        options (`BlockOptions`): Settings shared by all blocks.
    """

    has_attention: ClassVar[bool] = False
    downsample_type: ClassVar[str | None] = "conv"  # None: the UNet's `downsample_type`

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, options: BlockOptions
    ):
        layer_in_channels = [in_channels] + [out_channels] * (num_layers - 1)
        super().__init__(
            resnets=[options.resnet(c, out_channels) for c in layer_in_channels],
            attentions=[options.attention(out_channels) for _ in layer_in_channels] if self.has_attention else None,
        )
        kind = self.downsample_type or options.downsample_type
        self.downsamplers = nn.ModuleList([options.downsampler(out_channels, kind)]) if add_downsample else None
        # Channels of the skip connections `forward` returns, for the decoder to match.
        self.skip_channels = (out_channels,) * (num_layers + add_downsample)

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Maps `(B, C_in, H, W)` to `(B, C_out, H/2, W/2)` (no /2 without downsampler).

        Returns:
            The output and the activation after every layer and after the downsampler, which the
            decoder takes as skip connections.
        """
        skips = []
        for index in range(len(self.resnets)):
            hidden_states = self._layer(index, hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class AttnDownBlock2D(DownBlock2D):
    """`DownBlock2D` with self-attention after every ResNet block; downsamples as the UNet's `downsample_type` says."""

    has_attention = True
    downsample_type = None


class ResnetDownsampleBlock2D(DownBlock2D):
    """`DownBlock2D` whose downsampler is a ResNet block with average pooling (BigGAN style)."""

    downsample_type = "resnet"


class UpBlock2D(_LayerStack):
    """Decoder stage: ResNet blocks that each first concatenate one encoder skip, then an upsampler.

    Args:
        in_channels (`int`): Channels of the input (the deeper stage's output).
        out_channels (`int`): Channels of every layer and of the output.
        skip_channels (`Sequence[int]`): Channels of the skips this block consumes, in the order it
            consumes them (deepest first); one ResNet block each.
        add_upsample (`bool`): Whether to double the resolution at the end (not in the last stage).
        options (`BlockOptions`): Settings shared by all blocks.
    """

    has_attention: ClassVar[bool] = False
    upsample_type: ClassVar[str | None] = "conv"  # None: the UNet's `upsample_type`

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        skip_channels: Sequence[int],
        add_upsample: bool,
        options: BlockOptions,
    ):
        layer_in_channels = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        super().__init__(
            resnets=[options.resnet(c + skip, out_channels) for c, skip in zip(layer_in_channels, skip_channels)],
            attentions=[options.attention(out_channels) for _ in layer_in_channels] if self.has_attention else None,
        )
        kind = self.upsample_type or options.upsample_type
        self.upsamplers = nn.ModuleList([options.upsampler(out_channels, kind)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, skips: Sequence[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        """Maps `(B, C_in, H, W)` to `(B, C_out, 2H, 2W)` (no 2x without upsampler).

        `skips` holds this block's skip connections in the order the encoder produced them.
        """
        for index, skip in enumerate(reversed(skips)):
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = self._layer(index, hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class AttnUpBlock2D(UpBlock2D):
    """`UpBlock2D` with self-attention after every ResNet block; upsamples as the UNet's `upsample_type` says."""

    has_attention = True
    upsample_type = None


class ResnetUpsampleBlock2D(UpBlock2D):
    """`UpBlock2D` whose upsampler is a ResNet block with nearest upsampling (BigGAN style)."""

    upsample_type = "resnet"


class UNetMidBlock2D(_LayerStack):
    """The bottleneck at the lowest resolution: ResNet, then `num_layers` x (attention, ResNet).

    Args:
        channels (`int`): Input and output channels.
        options (`BlockOptions`): Settings shared by all blocks.
        num_layers (`int`, defaults to 1): Number of (attention, ResNet) pairs after the first ResNet.
        add_attention (`bool`, defaults to `True`): Whether to attend at all.
        output_scale_factor (`float`, defaults to 1.0): Divides every residual sum in this block.
        attn_norm_num_groups (`int`, *optional*): GroupNorm groups before attending. `None` means
            `options.norm_num_groups` with `"default"` time conditioning and no normalization with
            `"scale_shift"`, as in diffusers.
    """

    def __init__(
        self,
        channels: int,
        options: BlockOptions,
        num_layers: int = 1,
        add_attention: bool = True,
        output_scale_factor: float = 1.0,
        attn_norm_num_groups: int | None = None,
    ):
        if attn_norm_num_groups is None and options.resnet_time_scale_shift == "default":
            attn_norm_num_groups = options.norm_num_groups
        attentions = None
        if add_attention:
            attentions = [
                SpatialSelfAttention(
                    channels, options.attention_head_dim, attn_norm_num_groups, options.norm_eps, output_scale_factor
                )
                for _ in range(num_layers)
            ]
        resnets = [
            options.resnet(channels, channels, output_scale_factor=output_scale_factor) for _ in range(num_layers + 1)
        ]
        super().__init__(resnets, attentions)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Maps `(B, C, H, W)` to `(B, C, H, W)`."""
        # Layer i is (resnet i, attention i), so the final ResNet is left over.
        for index in range(len(self.resnets) - 1):
            hidden_states = self._layer(index, hidden_states, temb)
        return self._call(self.resnets[-1], hidden_states, temb)


# diffusers' block names (the values of `down_block_types` / `up_block_types` in a UNet config).
DOWN_BLOCKS: dict[str, type[DownBlock2D]] = {
    cls.__name__: cls for cls in (DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D)
}
UP_BLOCKS: dict[str, type[UpBlock2D]] = {
    cls.__name__: cls for cls in (UpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D)
}
