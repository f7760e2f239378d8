"""Recipes for `--recipe`: whole training configurations from papers, every setting with its source.

A recipe sets fields of [`TrainingConfig`] and [`DataConfig`] (the UNet comes with `model_config`); flags given on
the command line override it, and each override that contradicts the recipe is reported.

Sources of `ddpm-cifar10`, the CIFAR-10 run of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models",
arXiv:2006.11239), as their official code (github.com/hojonathanho/diffusion) runs it:
- [paper]: sec. 4 and appendix B.
- [run_cifar.py]: `scripts/run_cifar.py`, the defaults of `train()`.
- [tpu_utils.py]: `diffusion_tf/tpu_utils/tpu_utils.py` (`run_training`, `make_ema`) and `diffusion_tf/utils.py`
  (`get_warmed_up_lr`).
- [hub]: the scheduler_config.json of `google/ddpm-cifar10-32`, the port of that run's weights.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "ddpm-cifar10": {
        # The network: the paper's 35.7M-parameter UNet, with dropout 0.1 ([paper] appendix B; [run_cifar.py]
        # model_name="unet2d16b2", dropout=0.1); the `ddpm-cifar10` preset (presets.py) is that network.
        "model_config": "ddpm-cifar10",
        "resolution": 32,  # CIFAR-10's 32x32 images
        "random_flip": True,  # [paper] appendix B: random horizontal flips; [run_cifar.py] randflip=1
        # The diffusion: T = 1000, betas linear from 1e-4 to 0.02 ([paper] sec. 4; [run_cifar.py]
        # num_diffusion_timesteps=1000, beta_schedule="linear"), predicting the noise ([run_cifar.py]
        # model_mean_type="eps") with the unweighted MSE L_simple ([paper] eq. 14; loss_type="mse").
        "ddpm_num_steps": 1000,
        "ddpm_beta_schedule": "linear",
        "prediction_type": "epsilon",
        "snr_gamma": None,
        # Sampled with sigma_t^2 = beta_t, the variance of the paper's FID 3.17 ([run_cifar.py]
        # model_var_type="fixedlarge"; [hub] "variance_type": "fixed_large").
        "variance_type": "fixed_large",
        # Optimisation: Adam at 2e-4 after a 5,000-step linear warmup, then constant ([paper] appendix B;
        # [run_cifar.py] optimizer="adam", lr=2e-4, warmup=5000; [tpu_utils.py] get_warmed_up_lr). TensorFlow's
        # Adam defaults (beta1 0.9, beta2 0.999, epsilon 1e-8), no weight decay: AdamW with weight decay 0 is Adam.
        "learning_rate": 2e-4,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 5000,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "adam_weight_decay": 0.0,
        "max_grad_norm": 1.0,  # [run_cifar.py] grad_clip=1. (the global norm)
        # A batch of 128 ([paper] appendix B; [run_cifar.py] total_bs=128): with N processes, pass
        # --train_batch_size 128/N to keep the global batch.
        "train_batch_size": 128,
        "gradient_accumulation_steps": 1,
        "max_train_steps": 800_000,  # [paper] appendix B: "trained for 800k steps"
        # An EMA of decay 0.9999 from the first step on, no warm-up ([paper] appendix B; [tpu_utils.py]
        # make_ema: decay = 1e-10 at step 0, then ema_decay=0.9999).
        "use_ema": True,
        "ema_max_decay": 0.9999,
        "ema_warmup": False,
    },
}


def recipe_settings(name: str) -> dict[str, Any]:
    """The settings of a recipe; a `ValueError` listing the recipes for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; the recipes are: {', '.join(RECIPES)}.")
    return dict(RECIPES[name])
