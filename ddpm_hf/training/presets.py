"""UNet presets for `--model_config`: the paper's CIFAR-10 network, diffusers' example network, small CPU ones.

Presets leave out `in_channels`, `out_channels` and `sample_size`: those follow the training data.
A config.json passed instead may fix them, and then the data must match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32, the network of Ho et al. (2020) for CIFAR-10: 35,746,307 parameters at 3 channels.
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        dropout=0.1,
    ),
    # The default network of diffusers' train_unconditional.py example (113.7M parameters at 3 channels).
    "diffusers-example": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        layers_per_block=2,
    ),
    # 1.1M parameters: trains on the embedded 16 px digits in minutes on two CPU cores (the README's main job).
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # 45k parameters, one attention level, dropout on: for tests that train for a few steps at 8 px.
    "micro": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        dropout=0.1,
    ),
}


def load_unet_config(name_or_path: str) -> dict[str, Any]:
    """The UNet config of a preset name or a config.json file (as written by `UNet2DModel.save_pretrained`)."""
    if name_or_path in UNET_PRESETS:
        return dict(UNET_PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix != ".json" and not path.is_file():
        raise ValueError(
            f"Unknown model preset {name_or_path!r}: choose one of {', '.join(UNET_PRESETS)}, "
            "or pass the path of a UNet config.json."
        )
    if not path.is_file():
        raise FileNotFoundError(f"--model_config {name_or_path}: no such file.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"--model_config {path} is not valid JSON: {error}") from error
    # Keys such as "_class_name" and "_diffusers_version" describe the file, not the network.
    return {key: value for key, value in config.items() if not key.startswith("_")}


def downsampling_factor(unet_config: dict[str, Any]) -> int:
    """How much the UNet shrinks its input: each block but the last halves the resolution."""
    return 2 ** (len(unet_config.get("block_out_channels", (224, 448, 672, 896))) - 1)
