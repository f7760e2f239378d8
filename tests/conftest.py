"""Shared fixtures: tiny network configs that run in milliseconds on a CPU."""

import os

import pytest

# Tests never reach the real Hub; a test that needs a Hub starts its own local server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# An 8x8 RGB UNet with one attention level: ~60k parameters.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)


@pytest.fixture
def tiny_unet_config() -> dict:
    return dict(TINY_UNET_CONFIG)


def pytest_configure(config):
    # One intra-op thread: the tests' tiny networks gain nothing from more, and several test processes
    # (the multi-process training runs, the CLI subprocesses) must not oversubscribe a 2-core CI machine.
    import torch

    torch.set_num_threads(1)
