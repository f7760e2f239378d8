"""Spatial self-attention over the pixels of a feature map, and the mapping of its legacy weight names."""

import re

import torch
import torch.nn.functional as F
from torch import nn


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention among the H*W positions of a feature map, with a residual connection.

    The DDPM attention block (Ho et al. 2020, appendix B), computed with
    `F.scaled_dot_product_attention`. Weight names follow diffusers' `Attention`: `group_norm`, `to_q`,
    `to_k`, `to_v`, `to_out.0`.

    Args:
        channels (`int`): Channels of the feature map.
        head_dim (`int`, *optional*): Channels per head; `None` gives one head spanning all channels.
            As in diffusers there are `channels // head_dim` heads, so q, k and v have
            `heads * head_dim` channels (fewer than `channels` when `head_dim` does not divide it).
        norm_num_groups (`int`, *optional*): Groups of the GroupNorm applied before attending; `None`
            skips the normalization.
        eps (`float`, defaults to 1e-5): GroupNorm epsilon.
        rescale_output_factor (`float`, defaults to 1.0): The residual sum is divided by this.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int | None = None,
        norm_num_groups: int | None = 32,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        head_dim = head_dim or channels
        self.heads = channels // head_dim
        self.rescale_output_factor = rescale_output_factor
        inner_channels = self.heads * head_dim

        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=eps) if norm_num_groups else None
        self.to_q = nn.Linear(channels, inner_channels)
        self.to_k = nn.Linear(channels, inner_channels)
        self.to_v = nn.Linear(channels, inner_channels)
        # A list only so that the weight is named `to_out.0`, like diffusers' (projection, dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner_channels, channels)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Maps `(B, C, H, W)` to `(B, C, H, W)`."""
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)

        # One copy for NCHW inputs (rather than one inside each projection), none for channels_last ones.
        tokens = hidden_states.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C)
        query, key, value = (
            project(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, HW, head_dim)
            for project in (self.to_q, self.to_k, self.to_v)
        )
        attended = F.scaled_dot_product_attention(query, key, value)  # (B, heads, HW, head_dim)
        attended = self.to_out[0](attended.transpose(1, 2).flatten(2))  # (B, HW, C)

        hidden_states = attended.transpose(1, 2).unflatten(2, (height, width))  # (B, C, H, W), channels_last strides
        # The residual first: the sum takes its memory format, so NCHW activations stay NCHW without a copy.
        hidden_states = residual + hidden_states
        return hidden_states if self.rescale_output_factor == 1 else hidden_states / self.rescale_output_factor


# diffusers < 0.14 named the attention projections after the roles of q, k, v and the output projection.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"(.*attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)")


def convert_legacy_attention_keys(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Renames legacy attention weights (`query`, `key`, `value`, `proj_attn`) to today's names, in place.

    Old Hub checkpoints such as `google/ddpm-cifar10-32` still carry e.g.
    `down_blocks.1.attentions.0.query.weight`, which becomes `down_blocks.1.attentions.0.to_q.weight`.
    The tensors themselves are unchanged. Keys already using today's names are left alone.

    Args:
        state_dict (`dict[str, torch.Tensor]`): Modified in place.
        prefix (`str`, *optional*): Only keys starting with this prefix are renamed (for a UNet that is
            a submodule of the model being loaded).

    Returns:
        `dict[str, torch.Tensor]`: The same `state_dict`.
    """
    for key in [key for key in state_dict if key.startswith(prefix)]:
        match = _LEGACY_ATTENTION_KEY.fullmatch(key)
        if match:
            block, legacy_name, param = match.groups()
            state_dict[f"{block}{_LEGACY_ATTENTION_NAMES[legacy_name]}.{param}"] = state_dict.pop(key)
    return state_dict
