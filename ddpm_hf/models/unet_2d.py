"""The DDPM noise-prediction network: a UNet with timestep conditioning, drop-in for `diffusers.UNet2DModel`."""

import os
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput, logging
from torch import nn

from .attention import convert_legacy_attention_keys
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .resnet import ACTIVATIONS
from .unet_2d_blocks import DOWN_BLOCKS, IMAGE_CHANNELS, UP_BLOCKS, BlockOptions, UNetMidBlock2D, block_class

logger = logging.get_logger(__name__)


@dataclass
class UNet2DOutput(BaseOutput):
    """
    The output of [`UNet2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The network's prediction (the noise, for a DDPM).
    """

    sample: torch.Tensor


class UNet2DModel(ModelMixin, ConfigMixin):
    r"""
    A UNet that maps a noisy sample and its timestep to a sample-shaped prediction (Ho et al. 2020).

    Weight names and config keys are those of `diffusers.UNet2DModel`, so checkpoints load in both
    directions; old checkpoints with legacy attention names (`query`, `key`, `value`, `proj_attn`) load
    too. Unlike diffusers, `from_pretrained` raises instead of warning when weights are missing,
    unexpected or of the wrong shape. Besides DDPM's UNet it builds the NCSN++ networks of score SDEs
    (Song et al. 2021; the `Skip*` blocks, as in `google/ncsnpp-*`), with the same outputs as diffusers.

    Parameters:
        sample_size (`int` or `tuple[int, int]`, *optional*): Height and width of samples; informational.
        in_channels (`int`, defaults to 3): Channels of the input sample.
        out_channels (`int`, defaults to 3): Channels of the output.
        center_input_sample (`bool`, defaults to `False`): Map inputs from [0, 1] to [-1, 1] first.
        time_embedding_type (`"positional"`, `"fourier"` or `"learned"`): Sinusoidal embedding of integer
            timesteps; Gaussian Fourier features of log(sigma), with the output divided by sigma (score
            SDE models); or a learned table of `num_train_timesteps` rows.
        time_embedding_dim (`int`, *optional*): Size of the timestep embedding; `4 * block_out_channels[0]`.
        freq_shift (`int`, defaults to 0): `downscale_freq_shift` of the sinusoidal embedding.
        flip_sin_to_cos (`bool`, defaults to `True`): Order the sinusoidal embedding `[cos, sin]`.
        down_block_types (`tuple[str]`): Encoder stages, keys of `DOWN_BLOCKS`. The NCSN++ blocks
            (`SkipDownBlock2D`, `AttnSkipDownBlock2D`) come first: they carry the RGB input image down.
        mid_block_type (`"UNetMidBlock2D"` or `None`): The bottleneck; `None` skips it.
        up_block_types (`tuple[str]`): Decoder stages, keys of `UP_BLOCKS`. The NCSN++ blocks
            (`SkipUpBlock2D`, `AttnSkipUpBlock2D`) come last: they sum RGB predictions into the output.
        block_out_channels (`tuple[int]`): Channels of each stage, from the highest resolution down.
        layers_per_block (`int`, defaults to 2): ResNet blocks per encoder stage (the decoder has one more).
        mid_block_scale_factor (`float`, defaults to 1): Divides the residual sums of the mid block.
        downsample_padding (`int`, defaults to 1): Padding of the downsampling convolutions (not of the NCSN++
            blocks, which downsample with a FIR filter).
        downsample_type (`"conv"` or `"resnet"`): Downsampler of `AttnDownBlock2D`.
        upsample_type (`"conv"` or `"resnet"`): Upsampler of `AttnUpBlock2D`.
        dropout (`float`, defaults to 0.0): Dropout inside the ResNet blocks.
        act_fn (`str`, defaults to `"silu"`): Activation of the ResNet blocks.
        attention_head_dim (`int`, *optional*, defaults to 8): Channels per attention head; `None` gives
            one head per attention layer. At most the channels of every level that attends.
        norm_num_groups (`int`, *optional*, defaults to 32): GroupNorm groups of every layer but those of the
            NCSN++ blocks, which use min(channels // 4, 32); must divide the channels it normalizes. `None`
            (NCSN++ models only) gives the mid block and the output norm the NCSN++ rule too.
        attn_norm_num_groups (`int`, *optional*): GroupNorm groups of the mid-block attention (see
            [`UNetMidBlock2D`]).
        norm_eps (`float`, defaults to 1e-5): GroupNorm epsilon.
        resnet_time_scale_shift (`"default"` or `"scale_shift"`): How ResNet blocks apply the timestep
            embedding (see [`ResnetBlock2D`]).
        add_attention (`bool`, defaults to `True`): Whether the mid block attends.
        class_embed_type (`None`, `"timestep"` or `"identity"`): How `class_labels` are embedded before
            being added to the timestep embedding: a lookup table of `num_class_embeds` rows (`None`),
            the timestep projection and its own MLP (`"timestep"`), or as given (`"identity"`).
        num_class_embeds (`int`, *optional*): Number of classes for `class_embed_type=None`.
        num_train_timesteps (`int`, *optional*): Rows of the `"learned"` timestep embedding.

    Example:

    ```py
    >>> import torch
    >>> from ddpm_hf.models import UNet2DModel

    >>> unet = UNet2DModel(
    ...     sample_size=32,
    ...     block_out_channels=(32, 64),
    ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...     up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ... )
    >>> noise_pred = unet(torch.randn(4, 3, 32, 32), timestep=10).sample
    >>> noise_pred.shape
    torch.Size([4, 3, 32, 32])
    ```
    """

    _supports_gradient_checkpointing = True
    # Keep normalization layers in the storage dtype under diffusers' layerwise casting.
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: Literal["positional", "fourier", "learned"] = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: Literal["UNetMidBlock2D"] | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: Literal["conv", "resnet"] = "conv",
        upsample_type: Literal["conv", "resnet"] = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: Literal["default", "scale_shift"] = "default",
        add_attention: bool = True,
        class_embed_type: Literal["timestep", "identity"] | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        _validate_config(self.config)
        self.sample_size = sample_size
        base_channels = block_out_channels[0]
        time_embed_dim = time_embedding_dim or 4 * base_channels

        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)

        # Timestep t -> fixed (or looked-up) projection -> MLP; every ResNet block reads the result.
        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(base_channels, scale=16)
            projection_dim = 2 * base_channels
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(base_channels, flip_sin_to_cos, freq_shift)
            projection_dim = base_channels
        else:
            self.time_proj = nn.Embedding(num_train_timesteps, base_channels)
            projection_dim = base_channels
        self.time_embedding = TimestepEmbedding(projection_dim, time_embed_dim)

        # Class conditioning is added to the timestep embedding.
        if class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(projection_dim, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        else:
            self.class_embedding = None

        options = BlockOptions(
            temb_channels=time_embed_dim,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            act_fn=act_fn,
            dropout=dropout,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_head_dim=attention_head_dim,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
        )
        num_stages = len(block_out_channels)

        # Encoder: every stage but the last downsamples. Remember the channels of each skip connection,
        # stacked in the order `forward` stacks the skips.
        skip_channels = [base_channels]  # the output of conv_in
        self.down_blocks = nn.ModuleList()
        channels = base_channels
        for i, (block_type, stage_channels) in enumerate(zip(down_block_types, block_out_channels)):
            add_downsample = i < num_stages - 1
            with _building("down_block_types", i, block_type, stage_channels):
                block = block_class(DOWN_BLOCKS, block_type)(
                    channels, stage_channels, layers_per_block, add_downsample, options
                )
            self.down_blocks.append(block)
            skip_channels += block.skip_channels
            channels = stage_channels

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                channels,
                options,
                add_attention=add_attention,
                output_scale_factor=mid_block_scale_factor,
                attn_norm_num_groups=attn_norm_num_groups,
            )

        # Decoder: each stage pops one skip per ResNet block, deepest first. It has one ResNet block more
        # than its encoder stage, to also consume the skip from the downsampler (or from conv_in).
        self.up_blocks = nn.ModuleList()
        for i, (block_type, stage_channels) in enumerate(zip(up_block_types, reversed(block_out_channels))):
            block_skips = [skip_channels.pop() for _ in range(layers_per_block + 1)]
            add_upsample = i < num_stages - 1
            with _building("up_block_types", i, block_type, stage_channels):
                block = block_class(UP_BLOCKS, block_type)(channels, stage_channels, block_skips, add_upsample, options)
            self.up_blocks.append(block)
            channels = stage_channels

        self.conv_norm_out = nn.GroupNorm(options.groups(base_channels), base_channels, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(base_channels, out_channels, kernel_size=3, padding=1)

        # `load_state_dict` accepts legacy attention names too (the private hook works on torch < 2.5).
        self._register_load_state_dict_pre_hook(_convert_legacy_keys_hook)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        r"""
        Predicts the noise (or whatever the model was trained on) in `sample` at `timestep`.

        With `timestep` (and `class_labels`) already tensors on `sample`'s device, it never synchronizes
        with the device (no `.item()`, no branching on tensor values), so it can be captured in a CUDA graph.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                The noisy input; height and width must be multiples of `2 ** (len(block_out_channels) - 1)`.
            timestep (`torch.Tensor`, `float` or `int`): The timestep (a noise level `sigma` for
                `time_embedding_type="fourier"`), either one for the whole batch (a number or a 0-d or
                1-element tensor) or one per sample (shape `(batch_size,)`).
            class_labels (`torch.Tensor`, *optional*): Class indices of shape `(batch_size,)` (or the
                embeddings themselves for `class_embed_type="identity"`). Required exactly when the
                model has a class embedding.
            return_dict (`bool`, defaults to `True`): Return a [`UNet2DOutput`] instead of a tuple.

        Returns:
            [`UNet2DOutput`] or `tuple`: The prediction, of shape `(batch_size, out_channels, height, width)`.
        """
        self._check_inputs(sample, class_labels)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. Timestep (+ class) embedding; the projections are float32, the MLPs run in the model's dtype.
        dtype = self.dtype
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))  # (B, T)
        if self.class_embedding is not None:
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(dtype)
            emb = emb + self.class_embedding(class_labels).to(dtype)

        # 2. Encoder, keeping every intermediate activation as a skip connection. The NCSN++ blocks also carry
        #    the image itself down (`skip_sample`); the others pass it on.
        skip_sample = sample
        hidden_states = self.conv_in(sample)  # (B, C0, H, W)
        skips = [hidden_states]
        for block in self.down_blocks:
            hidden_states, block_skips, skip_sample = block(hidden_states, emb, skip_sample)
            skips += block_skips

        # 3. Bottleneck.
        if self.mid_block is not None:
            hidden_states = self.mid_block(hidden_states, emb)

        # 4. Decoder, consuming the skips from the deepest (last stacked) up. The NCSN++ blocks sum their RGB
        #    predictions into a new `skip_sample` on the way.
        skip_sample = None
        for block in self.up_blocks:
            num_skips = len(block.resnets)
            hidden_states, skip_sample = block(hidden_states, skips[-num_skips:], emb, skip_sample)
            skips = skips[:-num_skips]

        # 5. Output projection (plus the NCSN++ image path).
        sample = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))  # (B, C_out, H, W)
        if skip_sample is not None:
            sample = sample + skip_sample
        if self.config.time_embedding_type == "fourier":
            # Score-SDE parameterization: the network output is scaled by 1 / sigma.
            sample = sample / timesteps.reshape(-1, 1, 1, 1).to(sample.dtype)

        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)

    def _check_inputs(self, sample: torch.Tensor, class_labels: torch.Tensor | None) -> None:
        """Raises a clear error for inputs that would otherwise fail deep inside the network."""
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.ndim != 4 or sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(
                f"Expected `sample` of shape (batch, {self.config.in_channels}, height, width) with height and "
                f"width multiples of {factor}, got {tuple(sample.shape)}."
            )
        if self.class_embedding is not None and class_labels is None:
            raise ValueError(
                "`class_labels` are required: this model is class-conditional (class_embed_type="
                f"{self.config.class_embed_type!r}, num_class_embeds={self.config.num_class_embeds})."
            )
        if self.class_embedding is None and class_labels is not None:
            raise ValueError("`class_labels` were given, but this model has no class embedding.")

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """Called by `enable_xformers_memory_efficient_attention()`: attention here always runs
        `F.scaled_dot_product_attention`, whose memory-efficient kernel is xFormers' algorithm; nothing switches."""
        _keep_sdpa("xFormers", valid)

    def set_use_npu_flash_attention(self, valid: bool) -> None:
        """Called by `enable_npu_flash_attention()`; as [`set_use_memory_efficient_attention_xformers`]."""
        _keep_sdpa("NPU flash attention", valid)

    def set_use_xla_flash_attention(
        self, use_xla_flash_attention: bool, partition_spec: Callable | None = None, **kwargs: Any
    ) -> None:
        """Called by `enable_xla_flash_attention()`; as [`set_use_memory_efficient_attention_xformers`]."""
        _keep_sdpa("XLA flash attention", use_xla_flash_attention)

    def _fix_state_dict_keys_on_load(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called by `ModelMixin.from_pretrained` on the loaded weights before they are matched to the model."""
        return convert_legacy_attention_keys(state_dict)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "UNet2DModel":
        r"""
        Loads a model like [`~diffusers.ModelMixin.from_pretrained`], but refuses to half-load.

        diffusers only logs a warning when checkpoint weights are missing, unexpected or of another shape
        than the config implies (and keeps random weights for those); here that is an error.

        Raises:
            ValueError: Naming the checkpoint and listing the missing, unexpected and mismatched keys (or
                passing on diffusers' own error for mismatched shapes, with the checkpoint named).
        """
        location = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            location = os.path.join(location, kwargs["subfolder"])
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, output_loading_info=True, **kwargs
            )
        except ValueError as error:  # e.g. diffusers' shape-mismatch error, which does not name the checkpoint
            raise ValueError(f"Cannot load {cls.__name__} from {location!r}: {error}") from error

        problems = [
            f"{kind}: {sorted(loading_info[kind])}"
            for kind in ("missing_keys", "unexpected_keys")
            if loading_info.get(kind)
        ]
        problems += [
            f"mismatched_keys: {key} has shape {tuple(found)} in the checkpoint but {tuple(expected)} in the model"
            for key, found, expected in loading_info.get("mismatched_keys", ())
        ]
        if problems:
            raise ValueError(
                f"The weights at {location!r} do not match {cls.__name__}(**config):\n  " + "\n  ".join(problems)
            )
        return (model, loading_info) if output_loading_info else model


def _keep_sdpa(kernel: str, enable: bool) -> None:
    if enable:
        logger.warning(f"ddpm_hf's UNet2DModel always attends with torch's scaled_dot_product_attention (which picks "
                       f"a flash or memory-efficient kernel itself); {kernel} is not used.")


def _convert_legacy_keys_hook(state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """`load_state_dict` pre-hook of `UNet2DModel`."""
    convert_legacy_attention_keys(state_dict, prefix)


@contextmanager
def _building(option: str, index: int, block_type: str, channels: int) -> Iterator[None]:
    """Names the block whose construction failed, e.g. for NCSN++ groups (min(channels // 4, 32)) that do not divide
    a layer's channels, which diffusers does not build either."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"Cannot build {option}[{index}]={block_type!r} with {channels} channels: {error}") from error


def _check_option(name: str, value: Any, supported: Collection[Any]) -> None:
    if value not in supported:
        raise ValueError(f"Unsupported {name}={value!r}; supported values: {', '.join(map(repr, supported))}.")


def _block_classes(config: Any, option: str, table: dict[str, type]) -> list[type]:
    """The block classes `config.<option>` names; raises for an unknown name, listing the supported ones."""
    names = getattr(config, option)
    for name in names:
        if block_class(table, name) is None:
            _check_option(f"{option} entry", name, table)
    return [block_class(table, name) for name in names]


def _validate_config(config: Any) -> None:
    """Raises a `ValueError` naming the offending option for any config `UNet2DModel` cannot build.

    Each option is checked only where diffusers' blocks use it (say `attention_head_dim` at the levels that
    attend), so that every config diffusers can run is built here too.
    """
    _check_option("time_embedding_type", config.time_embedding_type, ("positional", "fourier", "learned"))
    _check_option("mid_block_type", config.mid_block_type, ("UNetMidBlock2D", None))
    _check_option("act_fn", config.act_fn, ACTIVATIONS)
    _check_option("resnet_time_scale_shift", config.resnet_time_scale_shift, ("default", "scale_shift"))
    _check_option("class_embed_type", config.class_embed_type, (None, "timestep", "identity"))
    down = _block_classes(config, "down_block_types", DOWN_BLOCKS)
    up = _block_classes(config, "up_block_types", UP_BLOCKS)

    channels = tuple(config.block_out_channels)
    if not len(channels) == len(down) == len(up):
        raise ValueError(
            "block_out_channels, down_block_types and up_block_types must have the same length, got "
            f"{channels}, {tuple(config.down_block_types)} and {tuple(config.up_block_types)}."
        )
    if config.layers_per_block < 1:
        raise ValueError(f"layers_per_block must be at least 1, got {config.layers_per_block}.")
    levels = len(channels)
    up_levels = list(zip(range(levels - 1, -1, -1), up))  # (level, block class), deepest first
    has_mid_attention = config.mid_block_type is not None and config.add_attention

    # The resamplers of the Attn* blocks (the last stage has none).
    if any(cls.downsample_type is None for cls in down[:-1]):
        _check_option("downsample_type", config.downsample_type, ("conv", "resnet"))
    if any(cls.upsample_type is None for cls in up[:-1]):
        _check_option("upsample_type", config.upsample_type, ("conv", "resnet"))

    _check_norm_num_groups(config.norm_num_groups, channels, down, up_levels, config.mid_block_type is not None)
    if has_mid_attention and config.attn_norm_num_groups is not None and channels[-1] % config.attn_norm_num_groups:
        raise ValueError(
            f"attn_norm_num_groups={config.attn_norm_num_groups} must divide block_out_channels[-1]={channels[-1]}."
        )
    attending = {channels[level] for level, cls in [*enumerate(down), *up_levels] if cls.attention_layers}
    attending |= {channels[-1]} if has_mid_attention else set()
    if config.attention_head_dim is not None and attending and config.attention_head_dim > min(attending):
        raise ValueError(
            f"attention_head_dim={config.attention_head_dim} must not exceed the channels of any level that "
            f"attends, {sorted(attending)} (block_out_channels={channels})."
        )
    _check_image_path(config, [cls.image_path for cls in down], [cls.image_path for cls in up])
    if config.time_embedding_type == "learned" and config.num_train_timesteps is None:
        raise ValueError('time_embedding_type="learned" needs num_train_timesteps (the rows of its table).')


def _check_norm_num_groups(
    groups: Any, channels: tuple[int, ...], down: list[type], up_levels: list[tuple[int, type]], has_mid: bool
) -> None:
    """`norm_num_groups` must divide the channels of every layer it normalizes: those of the blocks other than the
    NCSN++ ones, which choose their own groups, and, unless it is `None`, of the mid block and the output norm."""
    last = len(channels) - 1
    normalized = set()  # a level's layers see its own channels and its neighbours' (inputs, skip connections)
    for level, cls in enumerate(down):
        normalized |= set() if cls.image_path else {channels[max(level - 1, 0)], channels[level]}
    for level, cls in up_levels:
        neighbours = {channels[max(level - 1, 0)], channels[level], channels[min(level + 1, last)]}
        normalized |= set() if cls.image_path else neighbours
    if groups is None:
        if normalized:
            raise ValueError(
                "norm_num_groups=None must divide the channels of every layer it normalizes: only the Skip* "
                "(NCSN++) blocks choose their own groups; set it to an integer that divides "
                f"{sorted(normalized)}."
            )
        return
    normalized |= {channels[0]} | ({channels[-1]} if has_mid else set())
    if not isinstance(groups, int) or any(c % groups for c in normalized):
        raise ValueError(
            f"norm_num_groups={groups} must divide the channels of every layer it normalizes, {sorted(normalized)} "
            f"(block_out_channels={channels})."
        )


def _check_image_path(config: Any, down: list[bool], up: list[bool]) -> None:
    """The NCSN++ image path must run unbroken: from the input through the first down stages, and from the first
    NCSN++ up stage to the output, in RGB (diffusers' blocks hard-code 3 channels; other layouts fail on shapes)."""
    downsampling = down[:-1]  # the last stage passes the image path on untouched
    if downsampling != sorted(downsampling, reverse=True):
        raise ValueError(
            "The Skip* (NCSN++) down blocks must come first in down_block_types (they carry the input image down, "
            f"stage by stage), got {tuple(config.down_block_types)}."
        )
    if up != sorted(up):
        raise ValueError(
            "The Skip* (NCSN++) up blocks must come last in up_block_types (they carry their predictions up to "
            f"the output, stage by stage), got {tuple(config.up_block_types)}."
        )
    if any(downsampling) and config.in_channels != IMAGE_CHANNELS:
        raise ValueError(
            f"The Skip* (NCSN++) down blocks need in_channels={IMAGE_CHANNELS} (their image path is RGB, as in "
            f"diffusers), got in_channels={config.in_channels}."
        )
    if any(up[:-1]) and config.out_channels != IMAGE_CHANNELS:
        raise ValueError(
            f"The Skip* (NCSN++) up blocks need out_channels={IMAGE_CHANNELS} (their image path is RGB, as in "
            f"diffusers), got out_channels={config.out_channels}."
        )
