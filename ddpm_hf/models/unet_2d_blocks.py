"""The stages of the UNet: encoder (down) blocks, the middle block and decoder (up) blocks.

Every block is a stack of "layers" (a `ResnetBlock2D`, optionally followed by a `SpatialSelfAttention`)
plus at most one resampler. The block classes differ only in whether they attend, which resampler they
use and, for the NCSN++ blocks (`Skip*`), in carrying the image path; `BlockOptions` carries everything
else, so all down blocks share one constructor signature and all up blocks another, and `DOWN_BLOCKS` /
`UP_BLOCKS` map diffusers' block names to them.

The image path of NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", the
"input skip" and "output skip" progressive architectures) runs beside the feature maps at image
resolution: the encoder FIR-downsamples the input image and adds it to each stage's output through a
1x1 convolution; the decoder sums RGB predictions of every stage, FIR-upsampled, into the output. Every
block takes and returns it as `skip_sample` (the other blocks pass it on untouched).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SpatialSelfAttention
from .resnet import Downsample2D, FirDownsample2D, FirUpsample2D, Resample, ResnetBlock2D, Upsample2D

# The NCSN++ blocks' image path is RGB: diffusers hard-codes 3 channels in its 1x1 and 3x3 convolutions.
IMAGE_CHANNELS = 3

AttentionLayers = Literal["every", "last"] | None  # which layers of a block attend: after every ResNet, the last one


@dataclass(frozen=True)
class BlockOptions:
    """Settings shared by every block of one UNet, fixed once from its config."""

    temb_channels: int  # size of the timestep embedding each ResNet block reads
    norm_num_groups: int | None = 32  # None: min(channels // 4, 32) groups for each GroupNorm (the NCSN++ rule)
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    dropout: float = 0.0
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    attention_head_dim: int | None = 8  # None: one head as wide as the block
    downsample_padding: int = 1  # 0: TF "SAME" padding of the original DDPM checkpoints
    # Resampler of the Attn* blocks; the other blocks' resampler is fixed by their name, as in diffusers.
    downsample_type: Literal["conv", "resnet"] = "conv"
    upsample_type: Literal["conv", "resnet"] = "conv"
    output_scale_factor: float = 1.0  # divides every residual sum (sqrt(2) in NCSN++, to keep the variance)
    attention_norm_num_groups: int | None = None  # GroupNorm groups before attending; None: as the ResNet blocks

    def groups(self, channels: int) -> int:
        """GroupNorm groups for a layer of `channels` channels."""
        return self.norm_num_groups or min(channels // 4, 32)

    def resnet(
        self,
        in_channels: int,
        out_channels: int,
        resample: Resample | None = None,
        groups: int | None = None,
        use_in_shortcut: bool | None = None,
    ) -> ResnetBlock2D:
        """A ResNet block; `groups` overrides the groups of its first normalization."""
        return ResnetBlock2D(
            in_channels,
            out_channels,
            self.temb_channels,
            groups=groups or self.groups(in_channels),
            groups_out=self.groups(out_channels),
            eps=self.norm_eps,
            act_fn=self.act_fn,
            dropout=self.dropout,
            time_embedding_norm=self.resnet_time_scale_shift,
            output_scale_factor=self.output_scale_factor,
            resample=resample,
            use_in_shortcut=use_in_shortcut,
        )

    def attention(self, channels: int) -> SpatialSelfAttention:
        groups = self.attention_norm_num_groups or self.groups(channels)
        return SpatialSelfAttention(channels, self.attention_head_dim, groups, self.norm_eps, self.output_scale_factor)

    def downsampler(self, channels: int, kind: Literal["conv", "resnet"]) -> nn.Module:
        if kind == "resnet":
            return self.resnet(channels, channels, resample="down")
        return Downsample2D(channels, padding=self.downsample_padding)

    def upsampler(self, channels: int, kind: Literal["conv", "resnet"]) -> nn.Module:
        if kind == "resnet":
            return self.resnet(channels, channels, resample="up")
        return Upsample2D(channels)


def ncsnpp_options(options: BlockOptions) -> BlockOptions:
    """The settings of diffusers' NCSN++ blocks, whatever the UNet's config says: min(channels // 4, 32) groups per
    GroupNorm, 32 before attending, and residual sums divided by sqrt(2)."""
    return replace(options, norm_num_groups=None, attention_norm_num_groups=32, output_scale_factor=math.sqrt(2.0))


def _checkpoint(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(module, *args, use_reentrant=False)


class _LayerStack(nn.Module):
    """ResNet blocks, some followed by self-attention; handles gradient checkpointing.

    `attentions[k]` follows `resnets[first_attended_layer + k]`.
    """

    def __init__(
        self,
        resnets: list[ResnetBlock2D],
        attentions: list[SpatialSelfAttention] | None,
        first_attended_layer: int = 0,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.first_attended_layer = first_attended_layer
        # diffusers' ModelMixin.enable_gradient_checkpointing() sets both attributes on every module that has them.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = _checkpoint

    def _layer(self, index: int, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """ResNet block `index`, then its attention if it has one."""
        hidden_states = self._call(self.resnets[index], hidden_states, temb)
        attention_index = index - self.first_attended_layer
        if self.attentions is not None and 0 <= attention_index < len(self.attentions):
            hidden_states = self._call(self.attentions[attention_index], hidden_states)
        return hidden_states

    def _call(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """`module(*args)`, recomputed during backward instead of stored when checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


def _attentions(options: BlockOptions, channels: int, num_layers: int, layers: AttentionLayers) -> tuple[list, int]:
    """The attention layers of a block of `num_layers` ResNet blocks, and the index of the first one that attends."""
    count = {"every": num_layers, "last": 1, None: 0}[layers]
    return [options.attention(channels) for _ in range(count)], num_layers - count


class DownBlock2D(_LayerStack):
    """Encoder stage: `num_layers` ResNet blocks, then a strided-convolution downsampler.

    Args:
        in_channels (`int`): Channels of the input.
        out_channels (`int`): Channels of every layer and of the output.
        num_layers (`int`): Number of ResNet blocks.
        add_downsample (`bool`): Whether to halve the resolution at the end (not in the last stage).
        options (`BlockOptions`): Settings shared by all blocks.
    """

    attention_layers: ClassVar[AttentionLayers] = None
    downsample_type: ClassVar[str | None] = "conv"  # None: the UNet's `downsample_type`
    image_path: ClassVar[bool] = False  # an NCSN++ block, which carries the image path

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, options: BlockOptions
    ):
        layer_in_channels = [in_channels] + [out_channels] * (num_layers - 1)
        super().__init__(
            [options.resnet(c, out_channels) for c in layer_in_channels],
            *_attentions(options, out_channels, num_layers, self.attention_layers),
        )
        self._build_downsampler(out_channels, add_downsample, options)
        # Channels of the skip connections `forward` returns, for the decoder to match.
        self.skip_channels = (out_channels,) * (num_layers + add_downsample)

    def _build_downsampler(self, channels: int, add_downsample: bool, options: BlockOptions) -> None:
        kind = self.downsample_type or options.downsample_type
        self.downsamplers = nn.ModuleList([options.downsampler(channels, kind)]) if add_downsample else None

    def _downsample(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, skip_sample: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.downsamplers[0](hidden_states, temb), skip_sample

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, skip_sample: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Maps `(B, C_in, H, W)` to `(B, C_out, H/2, W/2)` (no /2 without downsampler).

        Returns:
            The output; the activation after every layer and after the downsampler, which the decoder takes as
            skip connections; and `skip_sample`, the image path, downsampled by the NCSN++ blocks.
        """
        skips = []
        for index in range(len(self.resnets)):
            hidden_states = self._layer(index, hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states, skip_sample = self._downsample(hidden_states, temb, skip_sample)
            skips.append(hidden_states)
        return hidden_states, tuple(skips), skip_sample


class AttnDownBlock2D(DownBlock2D):
    """`DownBlock2D` with self-attention after every ResNet block; downsamples as the UNet's `downsample_type` says."""

    attention_layers = "every"
    downsample_type = None


class ResnetDownsampleBlock2D(DownBlock2D):
    """`DownBlock2D` whose downsampler is a ResNet block with average pooling (BigGAN style)."""

    downsample_type = "resnet"


class SkipDownBlock2D(DownBlock2D):
    """NCSN++ encoder stage: `DownBlock2D` with NCSN++'s normalization and scaling (see [`ncsnpp_options`]), a ResNet
    block with FIR downsampling as its downsampler, and the image path: the image (`skip_sample`), FIR-downsampled,
    is added to the output through a 1x1 convolution."""

    image_path = True

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, options: BlockOptions
    ):
        super().__init__(in_channels, out_channels, num_layers, add_downsample, ncsnpp_options(options))

    def _build_downsampler(self, channels: int, add_downsample: bool, options: BlockOptions) -> None:
        self.resnet_down = self.downsamplers = self.skip_conv = None
        if add_downsample:
            self.resnet_down = options.resnet(channels, channels, resample="fir_down", use_in_shortcut=True)
            self.downsamplers = nn.ModuleList([FirDownsample2D()])  # of the image path
            self.skip_conv = nn.Conv2d(IMAGE_CHANNELS, channels, kernel_size=1)

    def _downsample(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, skip_sample: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = self.resnet_down(hidden_states, temb)
        skip_sample = self.downsamplers[0](skip_sample)  # (B, 3, H/2, W/2)
        return self.skip_conv(skip_sample) + hidden_states, skip_sample


class AttnSkipDownBlock2D(SkipDownBlock2D):
    """`SkipDownBlock2D` with self-attention after every ResNet block."""

    attention_layers = "every"


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

    attention_layers: ClassVar[AttentionLayers] = None
    upsample_type: ClassVar[str | None] = "conv"  # None: the UNet's `upsample_type`
    image_path: ClassVar[bool] = False  # an NCSN++ block, which carries the image path

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        skip_channels: Sequence[int],
        add_upsample: bool,
        options: BlockOptions,
    ):
        layer_in_channels = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        resnets = [
            options.resnet(c + skip, out_channels, groups=self._input_groups(c, skip, options))
            for c, skip in zip(layer_in_channels, skip_channels)
        ]
        super().__init__(resnets, *_attentions(options, out_channels, len(resnets), self.attention_layers))
        self._build_upsampler(out_channels, add_upsample, options)

    @staticmethod
    def _input_groups(in_channels: int, skip_channels: int, options: BlockOptions) -> int:
        """GroupNorm groups of a ResNet block's input, the concatenation of the previous layer and a skip."""
        return options.groups(in_channels + skip_channels)

    def _build_upsampler(self, channels: int, add_upsample: bool, options: BlockOptions) -> None:
        kind = self.upsample_type or options.upsample_type
        self.upsamplers = nn.ModuleList([options.upsampler(channels, kind)]) if add_upsample else None

    def _upsample(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, skip_sample: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states, skip_sample

    def forward(
        self,
        hidden_states: torch.Tensor,
        skips: Sequence[torch.Tensor],
        temb: torch.Tensor,
        skip_sample: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Maps `(B, C_in, H, W)` to `(B, C_out, 2H, 2W)` (no 2x without upsampler).

        `skips` holds this block's skip connections in the order the encoder produced them. Returns the output
        and `skip_sample`, the image path (`None` until the first NCSN++ block).
        """
        for index, skip in enumerate(reversed(skips)):
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = self._layer(index, hidden_states, temb)
        return self._upsample(hidden_states, temb, skip_sample)


class AttnUpBlock2D(UpBlock2D):
    """`UpBlock2D` with self-attention after every ResNet block; upsamples as the UNet's `upsample_type` says."""

    attention_layers = "every"
    upsample_type = None


class ResnetUpsampleBlock2D(UpBlock2D):
    """`UpBlock2D` whose upsampler is a ResNet block with nearest upsampling (BigGAN style)."""

    upsample_type = "resnet"


class SkipUpBlock2D(UpBlock2D):
    """NCSN++ decoder stage: `UpBlock2D` with NCSN++'s normalization and scaling (see [`ncsnpp_options`]), a ResNet
    block with FIR upsampling as its upsampler, and the image path: the sum of the previous stages' RGB predictions
    (`skip_sample`) is FIR-upsampled, and this stage's prediction (norm, SiLU, 3x3 convolution to RGB) added."""

    image_path = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        skip_channels: Sequence[int],
        add_upsample: bool,
        options: BlockOptions,
    ):
        super().__init__(in_channels, out_channels, skip_channels, add_upsample, ncsnpp_options(options))

    def _build_upsampler(self, channels: int, add_upsample: bool, options: BlockOptions) -> None:
        self.upsampler = FirUpsample2D()  # of the image path, in every stage
        self.resnet_up = self.skip_norm = self.act = self.skip_conv = None
        if add_upsample:
            self.resnet_up = options.resnet(channels, channels, resample="fir_up", use_in_shortcut=True)
            self.skip_norm = nn.GroupNorm(options.groups(channels), channels, eps=options.norm_eps)
            self.act = nn.SiLU()
            self.skip_conv = nn.Conv2d(channels, IMAGE_CHANNELS, kernel_size=3, padding=1)

    def _upsample(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, skip_sample: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if skip_sample is not None:
            skip_sample = self.upsampler(skip_sample)  # (B, 3, H, W)
        if self.resnet_up is not None:
            prediction = self.skip_conv(self.act(self.skip_norm(hidden_states)))  # (B, 3, H, W)
            skip_sample = prediction if skip_sample is None else skip_sample + prediction
            hidden_states = self.resnet_up(hidden_states, temb)
        return hidden_states, skip_sample


class AttnSkipUpBlock2D(SkipUpBlock2D):
    """`SkipUpBlock2D` with one self-attention, after its last ResNet block."""

    attention_layers = "last"

    @staticmethod
    def _input_groups(in_channels: int, skip_channels: int, options: BlockOptions) -> int:
        # diffusers writes `min(in_channels + skip_channels // 4, 32)` here (a precedence slip for
        # `(in_channels + skip_channels) // 4`); the same groups keep the same outputs.
        return min(in_channels + skip_channels // 4, 32)


class UNetMidBlock2D(_LayerStack):
    """The bottleneck at the lowest resolution: ResNet, then `num_layers` x (attention, ResNet).

    Args:
        channels (`int`): Input and output channels.
        options (`BlockOptions`): Settings shared by all blocks.
        num_layers (`int`, defaults to 1): Number of (attention, ResNet) pairs after the first ResNet.
        add_attention (`bool`, defaults to `True`): Whether to attend at all.
        output_scale_factor (`float`, defaults to 1.0): Divides every residual sum in this block.
        attn_norm_num_groups (`int`, *optional*): GroupNorm groups before attending. `None` means the ResNet
            blocks' groups with `"default"` time conditioning and no normalization with `"scale_shift"`, as in
            diffusers.
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
        options = replace(options, output_scale_factor=output_scale_factor)
        if attn_norm_num_groups is None and options.resnet_time_scale_shift == "default":
            attn_norm_num_groups = options.groups(channels)
        attentions = None
        if add_attention:
            attentions = [
                SpatialSelfAttention(
                    channels, options.attention_head_dim, attn_norm_num_groups, options.norm_eps, output_scale_factor
                )
                for _ in range(num_layers)
            ]
        super().__init__([options.resnet(channels, channels) for _ in range(num_layers + 1)], attentions)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Maps `(B, C, H, W)` to `(B, C, H, W)`."""
        # Layer i is (resnet i, attention i), so the final ResNet has no attention.
        for index in range(len(self.resnets)):
            hidden_states = self._layer(index, hidden_states, temb)
        return hidden_states


# diffusers' block names (the values of `down_block_types` / `up_block_types` in a UNet config).
DOWN_BLOCKS: dict[str, type[DownBlock2D]] = {
    cls.__name__: cls
    for cls in (DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D, SkipDownBlock2D, AttnSkipDownBlock2D)
}
UP_BLOCKS: dict[str, type[UpBlock2D]] = {
    cls.__name__: cls for cls in (UpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D, SkipUpBlock2D, AttnSkipUpBlock2D)
}


def block_class(table: dict[str, type], name: str) -> type | None:
    """The class of a `down_block_types` / `up_block_types` entry, or `None`. As diffusers does, a leading "UNetRes"
    (the block names of its first releases) is dropped."""
    return table.get(name.removeprefix("UNetRes"))
