"""The peer of the quality benchmarks: the loop of diffusers' train_unconditional.py, on diffusers' own classes.

`examples/unconditional_image_generation/train_unconditional.py`: x_t ~ q(x_t | x_0), MSE to the noise, AdamW,
gradient clipping, a diffusers LR schedule and `EMAModel`, on `diffusers.UNet2DModel` and `diffusers.DDPMScheduler`.
Two settings of it: `DEFAULTS`, the example's own (made for runs a hundred times longer), and `TUNED`, what a careful
user sets for a short run on small images. With a time budget (`max_minutes`), the peer does what a careful user
would: it times its first steps, sets the cosine schedule's horizon to the steps that fit and stops at the deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import diffusers
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ddpm_hf import DDPMPipeline
from ddpm_hf.training import TrainingConfig, load_train_data, load_unet_config

_CALIBRATION_STEPS = (2, 12)  # the steps whose time sets the horizon: inside the warmup, so the LR is unaffected


@dataclass(frozen=True)
class PeerConfig:
    """What the peer sets; the rest (data, batch, steps, seed) comes from the ddpm_hf `TrainingConfig` it is run with.

    Its batches are full ones (the last partial batch of an epoch is dropped, as ddpm_hf's loop does; the example
    keeps it: 29 of the 1,437 digits an epoch at batch 64).
    """

    learning_rate: float = 1e-4
    lr_warmup_steps: int = 500
    adam_betas: tuple[float, float] = (0.95, 0.999)
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    max_grad_norm: float = 1.0
    train_batch_size: int | None = None  # None: the TrainingConfig's
    layers_per_block: int | None = None  # None: the UNet preset's


DEFAULTS = PeerConfig()  # train_unconditional.py's defaults
# A careful user's short-run settings: a 10x larger LR with a short warmup, an EMA of ~1,000 steps, batch 64 and
# diffusers' usual two ResNet blocks per stage.
TUNED = replace(DEFAULTS, learning_rate=1e-3, lr_warmup_steps=100, ema_max_decay=0.999, train_batch_size=64,
                layers_per_block=2)


def train_peer(training: TrainingConfig, peer: PeerConfig, max_minutes: float | None = None
               ) -> tuple[DDPMPipeline, int]:
    """Trains the peer on `training`'s data; returns its EMA weights in a pipeline (for ddpm_hf's evaluation) and the
    number of steps it took.

    With `max_minutes`, the run's length is what fits in that many minutes (counted from this call), and it stops at
    the deadline; else it is `training.max_train_steps`.
    """
    started = time.perf_counter()
    data = load_train_data(training.data, seed=training.seed)
    torch.manual_seed(training.seed)
    unet_config = load_unet_config(training.model_config)
    if peer.layers_per_block is not None:
        unet_config["layers_per_block"] = peer.layers_per_block
    unet = diffusers.UNet2DModel(**unet_config, sample_size=training.data.resolution, in_channels=data.num_channels,
                                 out_channels=data.num_channels)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=training.ddpm_num_steps,
                                        beta_schedule=training.ddpm_beta_schedule)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=peer.learning_rate, betas=peer.adam_betas,
                                  weight_decay=peer.adam_weight_decay, eps=peer.adam_epsilon)
    horizon = training.max_train_steps if max_minutes is None else 10**9
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=peer.lr_warmup_steps,
                                 num_training_steps=horizon)
    ema = EMAModel(unet.parameters(), decay=peer.ema_max_decay, use_ema_warmup=True, inv_gamma=peer.ema_inv_gamma,
                   power=peer.ema_power)
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=peer.train_batch_size or training.train_batch_size,
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(training.seed))
    unet.train()
    step, timing_start, deadline = 0, None, None
    while step < horizon and (deadline is None or time.perf_counter() < deadline):
        for clean_images in loader:  # (B, C, H, W) in [-1, 1]
            noise = torch.randn_like(clean_images)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean_images),))
            noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
            loss = F.mse_loss(unet(noisy_images, timesteps).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), peer.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(unet.parameters())
            step += 1
            if max_minutes is not None and step == _CALIBRATION_STEPS[0]:
                timing_start = time.perf_counter()
            if max_minutes is not None and step == _CALIBRATION_STEPS[1]:
                per_step = (time.perf_counter() - timing_start) / (_CALIBRATION_STEPS[1] - _CALIBRATION_STEPS[0])
                deadline = started + max_minutes * 60
                horizon = step + int((deadline - time.perf_counter()) / per_step)
                # Still in the warmup, whose LR does not depend on the horizon: the schedule continues seamlessly.
                lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=peer.lr_warmup_steps,
                                             num_training_steps=horizon, last_epoch=step - 1)
            if step >= horizon or (deadline is not None and time.perf_counter() >= deadline):
                break
    ema.copy_to(unet.parameters())
    return DDPMPipeline(unet=unet.eval(), scheduler=scheduler), step
