"""`--recipe` (a paper's whole configuration), `--dry_run`, `--max_train_minutes` and learned variances."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpm_hf import DDPMPipeline, DDPMScheduler
from ddpm_hf.training import DataConfig, TrainingConfig, parse_args, train
from ddpm_hf.training.budget import steps_that_fit
from ddpm_hf.training.checkpointing import list_checkpoints
from ddpm_hf.training.losses import discretized_gaussian_log_likelihood, normal_kl, variational_bound_term
from ddpm_hf.schedulers.samplers import get_sampler
from ddpm_hf.training.recipes import RECIPES

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"


def quick_config(output_dir: Path, **overrides) -> TrainingConfig:
    """The micro UNet on 64 embedded digits at 8 px, nothing slow."""
    data = DataConfig(resolution=8, max_train_samples=64)
    settings = dict(model_config="micro", train_batch_size=8, max_train_steps=6, learning_rate=2e-3, lr_warmup_steps=2,
                    checkpointing_steps=3, logging_steps=3, save_images_steps=1000, eval_batch_size=4,
                    ddpm_num_inference_steps=5, logger="none", output_dir=str(output_dir), eval_at_end=False)
    return TrainingConfig(data=data, **{**settings, **overrides})


# --- --recipe and --dry_run ------------------------------------------------------------------------------


def test_the_ddpm_cifar10_recipe_is_the_papers_run():
    config = parse_args(["--recipe", "ddpm-cifar10"])
    assert (config.model_config, config.data.resolution, config.data.random_flip) == ("ddpm-cifar10", 32, True)
    assert (config.learning_rate, config.lr_scheduler, config.lr_warmup_steps) == (2e-4, "constant_with_warmup", 5000)
    assert (config.train_batch_size, config.max_grad_norm, config.max_train_steps) == (128, 1.0, 800_000)
    assert (config.ema_max_decay, config.ema_warmup, config.variance_type) == (0.9999, False, "fixed_large")
    assert (config.prediction_type, config.ddpm_beta_schedule, config.snr_gamma) == ("epsilon", "linear", None)
    assert config.recipe == "ddpm-cifar10" and config.adam_weight_decay == 0.0
    assert TrainingConfig.from_recipe("ddpm-cifar10") == config


def test_flags_override_the_recipe_and_say_so(caplog):
    with caplog.at_level(logging.WARNING):
        config = parse_args(["--learning_rate", "1e-4", "--recipe", "ddpm-cifar10", "--resolution", "32",
                             "--train_batch_size", "16"])
    assert config.learning_rate == 1e-4 and config.train_batch_size == 16 and config.lr_warmup_steps == 5000
    overrides = [record.getMessage() for record in caplog.records]
    assert overrides == ["--learning_rate 0.0001 overrides the ddpm-cifar10 recipe's 0.0002.",
                         "--train_batch_size 16 overrides the ddpm-cifar10 recipe's 128."]  # 32 agrees: no word


def test_an_unknown_recipe_lists_the_recipes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--recipe", "ddpm-celeba"])
    assert exit_info.value.code == 2
    assert f"Unknown recipe 'ddpm-celeba'; the recipes are: {', '.join(RECIPES)}." in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
        TrainingConfig.from_recipe("nope")


def test_dry_run_prints_the_resolved_configuration_and_touches_nothing(tmp_path):
    output_dir = tmp_path / "never"
    completed = subprocess.run([sys.executable, str(TRAIN), "--recipe", "ddpm-cifar10", "--dataset_name",
                                "no-such/dataset", "--lr_warmup_steps", "100", "--dry_run", "--output_dir",
                                str(output_dir)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    resolved = json.loads(completed.stdout)
    assert resolved["dataset_name"] == "no-such/dataset" and resolved["learning_rate"] == 2e-4  # data never read
    assert resolved["recipe_overrides"] == {"lr_warmup_steps": {"recipe": 5000, "given": 100}}
    assert resolved["unet"]["block_out_channels"] == [128, 256, 256, 256] and resolved["unet"]["dropout"] == 0.1
    assert resolved["scheduler"]["variance_type"] == "fixed_large"
    assert "hub_token" not in resolved and not output_dir.exists()


def test_the_recipe_saves_the_scheduler_the_paper_sampled_with(tmp_path):
    config = quick_config(tmp_path / "run", variance_type="fixed_large", ema_warmup=False, ema_max_decay=0.9999)
    pipeline = train(config)
    saved = json.loads((tmp_path / "run" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["variance_type"] == "fixed_large" and pipeline.scheduler.config.variance_type == "fixed_large"
    record = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert record["ema_warmup"] is False and record["total_steps"] == 6


def test_ema_without_warmup_is_the_papers_fixed_decay(tmp_path):
    """The DDPM code's EMA: a copy of the weights after the first step, then decay 0.9999 at every step."""
    from diffusers.training_utils import EMAModel

    parameters = [torch.nn.Parameter(torch.zeros(3))]
    ema = EMAModel(parameters, decay=0.9999, use_ema_warmup=False, min_decay=0.9999)
    decays = [ema.get_decay(step) for step in (1, 2, 10, 1000)]
    assert decays == [0.0, 0.9999, 0.9999, 0.9999]


# --- --max_train_minutes --------------------------------------------------------------------------------


def test_a_time_budget_decides_the_length_once_and_records_it(tmp_path):
    output_dir = tmp_path / "run"
    train(quick_config(output_dir, max_train_steps=100_000, max_train_minutes=0.1, checkpointing_steps=2,
                       checkpoints_total_limit=None))
    record = json.loads((output_dir / "training_config.json").read_text())
    decided = json.loads((output_dir / "checkpoints/checkpoint-2/train_state_0.json").read_text())["total_steps"]
    assert 2 <= record["total_steps"] <= decided < 100_000 and record["global_step"] == record["total_steps"]
    assert record["training_time_seconds"] <= 0.1 * 60
    for checkpoint in list_checkpoints(output_dir):  # the decided length; the step it stopped at if the deadline came
        assert json.loads((checkpoint / "train_state_0.json").read_text())["total_steps"] in (decided,
                                                                                           record["total_steps"])


def test_a_resumed_budget_run_keeps_the_length_and_ends_bit_identical(tmp_path):
    """Calibration leaves no trace and a resumed run trains to the length decided at the start: resuming a budget
    run's checkpoint gives bit for bit the run that --max_train_steps with that length gives."""
    settings = dict(checkpointing_steps=2, checkpoints_total_limit=None)
    budgeted = tmp_path / "budgeted"
    train(quick_config(budgeted, max_train_minutes=0.1, max_train_steps=100_000, **settings))
    decided = json.loads((budgeted / "checkpoints/checkpoint-2/train_state_0.json").read_text())["total_steps"]

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(budgeted / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    # More minutes this time: the length (and the LR horizon) stays the one decided when the run started.
    train(quick_config(resumed, max_train_minutes=5, max_train_steps=100_000, resume_from_checkpoint="latest",
                       **settings))
    fixed = tmp_path / "fixed"
    train(quick_config(fixed, max_train_steps=decided, **settings))
    assert json.loads((resumed / "training_config.json").read_text())["total_steps"] == decided
    for component in ("unet", "unet_raw"):
        a = load_file(resumed / component / "diffusion_pytorch_model.safetensors")
        b = load_file(fixed / component / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_at_the_deadline_the_run_checkpoints_saves_and_ends(tmp_path):
    """A resumed run whose budget is spent (a smaller one than the time its checkpoint already took): it stops after
    its first step, with a checkpoint and the pipeline, at the length decided when the run started."""
    output_dir = tmp_path / "run"
    settings = dict(max_train_steps=100_000, checkpointing_steps=2, checkpoints_total_limit=None)
    train(quick_config(output_dir, max_train_minutes=0.1, **settings))
    checkpoint = output_dir / "checkpoints" / "checkpoint-2"
    shutil.rmtree(output_dir / "unet")
    train(quick_config(output_dir, max_train_minutes=1e-4, resume_from_checkpoint=str(checkpoint), **settings))
    assert json.loads((output_dir / "checkpoints" / "checkpoint-3" / "train_state_0.json").read_text())[
        "total_steps"] == 3
    assert json.loads((output_dir / "training_config.json").read_text())["global_step"] == 3
    assert DDPMPipeline.from_pretrained(output_dir).unet.config.sample_size == 8


@pytest.mark.parametrize("seconds, periodic, expected", [
    (14.0, [(10, 5.0)], 10),  # 10 steps, no grid before the last (spread over the steps it would be 9)
    (15.9, [(10, 5.0)], 10),  # an 11th step brings the grid after step 10: 16 s
    (16.0, [(10, 5.0)], 11),
    (30.0, [(5, 10.0)], 10),
    (100.0, [(10, 5.0), (3, 1.0)], 57),  # 57 + 5 * 5 + 18 * 1 = 100 (spread over the steps: 54)
    (0.5, [(10, 5.0)], 0),  # not one step
])
def test_the_steps_that_fit_count_the_grids_and_checkpoints_they_pay_for(seconds, periodic, expected):
    """Every `every` steps, before the last, costs `cost` seconds: the answer fits and one more step would not."""
    def run_s(steps):
        return steps * 1.0 + sum((steps - 1) // every * cost for every, cost in periodic)

    steps = steps_that_fit(seconds, 1.0, periodic)
    assert steps == 0 or run_s(steps) <= seconds
    assert run_s(steps + 1) > seconds
    spread = int(seconds / (1.0 + sum(cost / every for every, cost in periodic)))  # the old estimate, never more
    assert steps == expected >= spread


@pytest.mark.parametrize("minutes", [0, -1, math.nan, math.inf])
def test_a_budget_that_is_not_a_positive_number_is_refused(tmp_path, minutes):
    with pytest.raises(ValueError, match=r"--max_train_minutes must be a positive number, got"):
        quick_config(tmp_path, max_train_minutes=minutes)


def test_a_budget_too_small_for_one_step_is_a_one_line_error(tmp_path):
    output_dir = tmp_path / "run"
    completed = subprocess.run([sys.executable, str(TRAIN), "--model_config", "micro", "--resolution", "8",
                                "--max_train_samples", "64", "--logger", "none", "--max_train_minutes", "0.001",
                                "--output_dir", str(output_dir)], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 2
    message = completed.stderr.strip().splitlines()[-1]
    assert message.startswith("train.py: error: --max_train_minutes 0.001 leaves no time to train: a step takes")
    assert "Give at least" in message and not output_dir.exists()


# --- learned variances: L_hybrid ------------------------------------------------------------------------


def test_normal_kl_and_the_decoder_likelihood_are_the_closed_forms():
    mean1, mean2 = torch.randn(50), torch.randn(50)
    log_variance1, log_variance2 = torch.randn(50), torch.randn(50)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean1, (0.5 * log_variance1).exp()),
                                                 torch.distributions.Normal(mean2, (0.5 * log_variance2).exp()))
    torch.testing.assert_close(normal_kl(mean1, log_variance1, mean2, log_variance2), expected)
    # Each bin's probability, over all 256 8-bit values, sums to one (the edge bins reach to +-inf).
    x = torch.arange(256) / 127.5 - 1
    probabilities = discretized_gaussian_log_likelihood(x, torch.tensor(0.3), torch.tensor(-1.0)).exp()
    torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0))


def test_the_variational_bound_vanishes_for_the_true_posterior():
    """With the true noise and the posterior variance (learned_range output -1: log beta~_t) the KL is zero, for
    t > 0; the t = 0 term is the decoder's NLL, positive; and only the variance gets gradients."""
    scheduler = DDPMScheduler(variance_type="learned_range")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    timesteps = torch.tensor([0, 1, 500, 999])
    x_t = scheduler.add_noise(x0, noise, timesteps)
    variance = torch.full_like(x0, -1.0, requires_grad=True)
    predicted = noise.clone().requires_grad_(True)
    terms = variational_bound_term(scheduler, predicted.detach(), variance, x0, x_t, timesteps)
    assert terms[0] > 0 and torch.allclose(terms[1:], torch.zeros(3), atol=1e-4)
    # beta_t instead: far from beta~_t at small t, a positive KL; the two coincide at large t (Ho et al. 2020, sec. 3.2).
    wrong = variational_bound_term(scheduler, noise, torch.full_like(x0, 1.0), x0, x_t, timesteps)
    assert wrong[1] > 0.1 and wrong[3] < 1e-6
    terms.sum().backward()
    assert variance.grad is not None and predicted.grad is None


def test_a_learned_variance_model_trains_and_samples(tmp_path):
    pipeline = train(quick_config(tmp_path / "run", variance_type="learned_range", eval_at_end=True,
                                  eval_num_samples=16, eval_steps=5))
    assert pipeline.unet.config.out_channels == 2 * pipeline.unet.config.in_channels
    assert pipeline.scheduler.config.variance_type == "learned_range"
    images = pipeline(batch_size=2, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()
    # The other samplers take the noise prediction alone (the variance channels are the DDPM sampler's).
    for name in ("ddim", "dpm-solver", "unipc", "euler-ancestral"):
        pipeline.scheduler = get_sampler(name).make_scheduler(pipeline.scheduler.config)
        assert pipeline(batch_size=2, num_inference_steps=5, output_type="np").images.shape == (2, 8, 8, 1)
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["frechet_distance"] > 0


@pytest.mark.parametrize("overrides, message", [
    (dict(variance_type="learned"), "--variance_type learned .* cannot be trained here; use learned_range"),
    (dict(variance_type="learned_range", prediction_type="v_prediction"), "not supported with it"),
    (dict(vlb_weight=-1.0), "--vlb_weight must be >= 0, got -1.0"),
])
def test_learned_variance_settings_that_cannot_train_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        quick_config(tmp_path, **overrides)
