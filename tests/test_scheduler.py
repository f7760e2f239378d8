"""DDPMScheduler: parity with diffusers.DDPMScheduler, the closed forms of Ho et al. 2020, configs and bad input.

The closed-form tests recompute every quantity independently in float64 from `betas`.
"""

import json
from typing import get_args

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from ddpm_hf.schedulers import DDPMScheduler, DDPMSchedulerOutput
from ddpm_hf.schedulers.beta_schedules import BETA_SCHEDULES
from ddpm_hf.schedulers.scheduling_ddpm import BetaSchedule, PredictionType, TimestepSpacing, VarianceType

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
ATOL = 1e-6
BETA_SCHEDULE_NAMES = get_args(BetaSchedule)
VARIANCE_TYPES = get_args(VarianceType)
PREDICTION_TYPES = get_args(PredictionType)
TIMESTEP_SPACINGS = get_args(TimestepSpacing)


def reference(**config) -> diffusers.DDPMScheduler:
    """diffusers' scheduler for the same config. Its "fixed_large_log" gives NaN (it takes sqrt(log beta_t)); ours
    means sigma_t = sqrt(beta_t), which diffusers calls "fixed_large"."""
    if config.get("variance_type") == "fixed_large_log":
        config = {**config, "variance_type": "fixed_large"}
    return diffusers.DDPMScheduler(**config)


def randn(seed: int, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def fake_model(sample: torch.Tensor, t, variance_type: str = "fixed_small") -> torch.Tensor:
    """A deterministic stand-in for a UNet: 0.1 x_t + t / 1000, then variance channels for learned variances."""
    prediction = 0.1 * sample + t / 1000
    if variance_type == "learned":  # sigma_t^2 itself: positive
        return torch.cat([prediction, torch.sigmoid(sample)], dim=1)
    if variance_type == "learned_range":  # an interpolation weight in [-1, 1]
        return torch.cat([prediction, torch.tanh(sample)], dim=1)
    return prediction


def sample_loop(scheduler, variance_type: str, timesteps=None, seed: int = 0):
    """Runs the reverse process from fixed noise; returns every step's (prev_sample, pred_original_sample) and the
    generator."""
    generator = torch.Generator().manual_seed(seed + 1)
    sample, outputs = randn(seed), []
    for t in scheduler.timesteps if timesteps is None else timesteps:
        out = scheduler.step(fake_model(sample, t, variance_type), t, sample, generator=generator)
        outputs.append((out.prev_sample, out.pred_original_sample))
        sample = out.prev_sample
    return outputs, generator


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL):
    """|actual - expected| <= atol, with NaN and inf exactly where expected has them. (torch.testing.assert_close
    takes ~0.5 ms a call, too slow for the parity grid.)"""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    difference = float(torch.where(same, 0.0, (actual - expected).abs()).max())
    assert difference <= atol, f"max |difference| is {difference}, more than {atol}"


def assert_same_outputs(ours, theirs, atol=ATOL):
    """Every step's prev_sample and pred_original_sample agree within atol."""
    assert len(ours) == len(theirs)
    for (prev, x0), (ref_prev, ref_x0) in zip(ours, theirs):
        assert_close(prev, ref_prev, atol)
        assert_close(x0, ref_x0, atol)


def float64_schedule(scheduler):
    """(betas, alphas, alpha_bars) in float64, recomputed from the scheduler's betas."""
    betas = scheduler.betas.double()
    alphas = 1 - betas
    return betas, alphas, torch.cumprod(alphas, dim=0)


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
@pytest.mark.parametrize("thresholding", [False, True])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("timestep_spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULE_NAMES)
def test_sampling_loop_matches_diffusers(beta_schedule, variance_type, prediction_type, timestep_spacing,
                                         clip_sample, thresholding, rescale_betas_zero_snr):
    # Epsilon-prediction with zero terminal SNR divides by sqrt(alpha_bar_999) = 0 wherever t = 999 is visited
    # ("linspace", "trailing"): diffusers gives inf/NaN there, and so must we (assert_close checks where).
    config = dict(beta_schedule=beta_schedule, variance_type=variance_type, prediction_type=prediction_type,
                  timestep_spacing=timestep_spacing, clip_sample=clip_sample, thresholding=thresholding,
                  rescale_betas_zero_snr=rescale_betas_zero_snr)
    ours, theirs = DDPMScheduler(**config), reference(**config)
    ours.set_timesteps(5)  # 5 steps keep the 2160 cases fast; the loops below run up to 50
    theirs.set_timesteps(5)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert_same_outputs(sample_loop(ours, variance_type)[0], sample_loop(theirs, variance_type)[0])


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_step_before_set_timesteps_matches_diffusers(variance_type, prediction_type):
    """Before `set_timesteps` both step through all 1000 training timesteps; Python-int timesteps draw the noise
    exactly as diffusers does, so the generators end in the same state."""
    config = dict(variance_type=variance_type, prediction_type=prediction_type, clip_sample=False)
    ours, theirs = DDPMScheduler(**config), reference(**config)
    timesteps = [999, 998, 500, 1, 0]
    ours_outputs, ours_generator = sample_loop(ours, variance_type, timesteps)
    theirs_outputs, theirs_generator = sample_loop(theirs, variance_type, timesteps)
    assert_same_outputs(ours_outputs, theirs_outputs)
    assert torch.equal(ours_generator.get_state(), theirs_generator.get_state())


@pytest.mark.parametrize("config, set_timesteps", [
    (dict(), dict(timesteps=[999, 800, 555, 100, 3, 0])),
    (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True), dict(timesteps=[999, 500, 7])),
    (dict(steps_offset=1), dict(num_inference_steps=20)),
    (dict(trained_betas=np.linspace(1e-3, 0.05, 100).tolist(), num_train_timesteps=100), dict(num_inference_steps=8)),
    (dict(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
     dict(num_inference_steps=50)),
])
def test_custom_schedules_match_diffusers(config, set_timesteps):
    ours, theirs = DDPMScheduler(**config), reference(**config)
    ours.set_timesteps(**set_timesteps)
    theirs.set_timesteps(**set_timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert_same_outputs(sample_loop(ours, "fixed_small")[0], sample_loop(theirs, "fixed_small")[0])


@pytest.mark.parametrize("timestep_spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_inference_steps", [1, 3, 7, 10, 50, 333, 999])
def test_set_timesteps_matches_diffusers(timestep_spacing, steps_offset, num_inference_steps):
    config = dict(timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    ours, theirs = DDPMScheduler(**config), reference(**config)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.num_inference_steps == num_inference_steps == len(ours.timesteps)


def test_trailing_spacing_keeps_n_timesteps_where_diffusers_adds_a_negative_one():
    """diffusers quirk, not reproduced: for some n its "trailing" arange rounds to n + 1 values ending in -1."""
    ours, theirs = DDPMScheduler(timestep_spacing="trailing"), reference(timestep_spacing="trailing")
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and theirs.timesteps[-1] == -1
    assert torch.equal(ours.timesteps, theirs.timesteps[:61])


@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULE_NAMES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule, rescale_betas_zero_snr):
    config = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale_betas_zero_snr)
    ours, theirs = DDPMScheduler(**config), reference(**config)
    torch.testing.assert_close(ours.betas, theirs.betas, atol=0, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=0, rtol=0)
    x0, noise = randn(0, (4, 3, 4, 4)), randn(1, (4, 3, 4, 4))
    for timesteps in (torch.tensor([0, 1, 500, 999]), torch.tensor(250)):
        torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.get_velocity(x0, noise, timesteps),
                                   theirs.get_velocity(x0, noise, timesteps), atol=ATOL, rtol=0)


def test_per_sample_generators_match_diffusers():
    ours, theirs = DDPMScheduler(), reference()
    sample, model_output = randn(0), randn(1)
    outputs = [scheduler.step(model_output, 500, sample, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
               for scheduler in (ours, theirs)]
    torch.testing.assert_close(outputs[0].prev_sample, outputs[1].prev_sample, atol=ATOL, rtol=0)


def test_int_and_tensor_timesteps_give_the_same_samples():
    """A tensor timestep masks the noise at t = 0 instead of skipping its draw: same samples, one more draw."""
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    by_tensor, tensor_generator = sample_loop(scheduler, "fixed_small")
    by_int, int_generator = sample_loop(scheduler, "fixed_small", [int(t) for t in scheduler.timesteps])
    assert_same_outputs(by_tensor, by_int, atol=0)
    torch.randn(SHAPE, generator=int_generator)  # the draw the int loop skipped at t = 0
    assert torch.equal(tensor_generator.get_state(), int_generator.get_state())


def test_seeded_loop_gives_fixed_values():
    """The default config, 10 steps, noise seed 0, generator seed 1: x_0's first values, as diffusers 0.42.1 gives."""
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    final = sample_loop(scheduler, "fixed_small")[0][-1][0]
    expected = torch.tensor([-1.0, -0.522642, 1.0, -0.998855, -0.408505, -0.541935, -1.0, -0.486845])
    torch.testing.assert_close(final.flatten()[:8], expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Closed forms of Ho et al. 2020, in float64. The scheduler computes in float32, as diffusers does, and 1 - alpha_bar
# cancels digits while alpha_bar is close to 1; so the step checks use t >= 100, where a wrong formula is far off.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULE_NAMES)
def test_alphas_cumprod_is_the_product_of_one_minus_betas(beta_schedule):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
    scheduler = DDPMScheduler(beta_schedule=beta_schedule)
    betas, alphas, alpha_bars = float64_schedule(scheduler)
    torch.testing.assert_close(scheduler.alphas.double(), alphas, atol=1e-7, rtol=0)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), alpha_bars, atol=1e-6, rtol=1e-5)
    assert bool(((betas > 0) & (betas < 1)).all())
    assert bool((alpha_bars[1:] < alpha_bars[:-1]).all())  # the signal decays monotonically


def test_linear_and_cosine_betas_follow_their_papers():
    linear = DDPMScheduler(beta_schedule="linear").betas.double()
    torch.testing.assert_close(linear, torch.from_numpy(np.linspace(1e-4, 0.02, 1000)), atol=0, rtol=2e-7)
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi / 2).
    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    f = lambda t: torch.cos((t / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2  # noqa: E731
    t = torch.arange(1, 1001, dtype=torch.float64)
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(float64_schedule(cosine)[2][:990], expected[:990], atol=1e-6, rtol=1e-4)


def test_zero_terminal_snr_rescaling():
    """Lin et al. 2023: alpha_bar_T becomes 0 while alpha_bar_1 is kept."""
    plain, rescaled = DDPMScheduler(), DDPMScheduler(rescale_betas_zero_snr=True)
    assert rescaled.alphas_cumprod[-1] == 0 and plain.alphas_cumprod[-1] > 0
    torch.testing.assert_close(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0], atol=1e-7, rtol=0)


def test_add_noise_is_q_xt_given_x0():
    """eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, per-sample t."""
    scheduler = DDPMScheduler()
    alpha_bars = float64_schedule(scheduler)[2]
    x0, noise, timesteps = randn(0), randn(1), torch.tensor([3, 700])
    a = alpha_bars[timesteps].view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    torch.testing.assert_close(scheduler.add_noise(x0, noise, timesteps).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_inference_steps", [None, 10])
def test_posterior_is_bayes_rule(num_inference_steps):
    """eq. 6-7: q(x_{t-1} | x_t, x_0) from Bayes' rule on x_{t-1} ~ N(sqrt(abar') x_0, 1 - abar') and
    x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, 1 - alpha), alpha = abar_t / abar' (the step's alpha_t); `step` then draws
    x_{t-1} = mean + sqrt(beta~_t) z with the generator's z (prediction_type="sample": x_0 is the model output)."""
    scheduler = DDPMScheduler(prediction_type="sample", clip_sample=False)
    if num_inference_steps:
        scheduler.set_timesteps(num_inference_steps)
    alpha_bars = float64_schedule(scheduler)[2]
    x0, x_t = randn(0), randn(1)
    for t in (999, 900, 500, 100):
        if num_inference_steps and t not in scheduler.timesteps:
            continue
        prev_t = scheduler.previous_timestep(t)
        assert prev_t == (t - 1 if num_inference_steps is None else t - 100)
        abar_t, abar_prev = alpha_bars[t], alpha_bars[prev_t]
        alpha = abar_t / abar_prev
        variance = 1 / (1 / (1 - abar_prev) + alpha / (1 - alpha))
        coef_x0 = variance * abar_prev.sqrt() / (1 - abar_prev)
        coef_xt = variance * alpha.sqrt() / (1 - alpha)
        torch.testing.assert_close(scheduler.posterior_variance[t].double(), variance, atol=0, rtol=5e-4)
        torch.testing.assert_close(scheduler.posterior_mean_coef1[t].double(), coef_x0, atol=0, rtol=5e-4)
        torch.testing.assert_close(scheduler.posterior_mean_coef2[t].double(), coef_xt, atol=0, rtol=5e-4)

        prev_sample = scheduler.step(x0, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        z = randn(7)
        expected = coef_x0 * x0.double() + coef_xt * x_t.double() + variance.sqrt() * z.double()
        torch.testing.assert_close(prev_sample.double(), expected, atol=1e-5, rtol=0)


def test_epsilon_step_is_eq_11():
    """With an eps-model and no clipping, x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z
    (eq. 11, Algorithm 2), sigma_t^2 = beta_t for "fixed_large"."""
    scheduler = DDPMScheduler(clip_sample=False, variance_type="fixed_large")
    betas, alphas, alpha_bars = float64_schedule(scheduler)
    x_t, eps = randn(0), randn(1)
    for t in (999, 500, 100):
        prev_sample = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        mean = (x_t.double() - betas[t] / (1 - alpha_bars[t]).sqrt() * eps.double()) / alphas[t].sqrt()
        expected = mean + betas[t].sqrt() * randn(7).double()
        torch.testing.assert_close(prev_sample.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_x0_prediction_inverts_the_forward_process(prediction_type):
    """eq. 15 (epsilon), identity (sample) and v = sqrt(abar) eps - sqrt(1 - abar) x_0 (v-prediction) all give back the
    x_0 that `add_noise` started from, given the true target."""
    scheduler = DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
    x0, eps = randn(0), randn(1)
    for t in (999, 500, 10):
        timesteps = torch.tensor([t, t])
        x_t = scheduler.add_noise(x0, eps, timesteps)
        target = {"epsilon": eps, "sample": x0, "v_prediction": scheduler.get_velocity(x0, eps, timesteps)}
        predicted = scheduler.step(target[prediction_type], t, x_t).pred_original_sample
        torch.testing.assert_close(predicted, x0, atol=2e-4, rtol=1e-4)


def test_velocity_identity():
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0, and with x_t from eq. 4: eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    scheduler = DDPMScheduler()
    alpha_bars = float64_schedule(scheduler)[2]
    x0, eps, timesteps = randn(0), randn(1), torch.tensor([20, 900])
    a = alpha_bars[timesteps].view(-1, 1, 1, 1)
    v = scheduler.get_velocity(x0, eps, timesteps).double()
    torch.testing.assert_close(v, a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double(), atol=1e-5, rtol=0)
    x_t = scheduler.add_noise(x0, eps, timesteps).double()
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * x_t, eps.double(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling behaviour
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
def test_noise_is_added_except_at_the_last_step(as_tensor):
    """Algorithm 2: z = 0 at the last step, so x_0 does not depend on the generator; earlier steps do."""
    scheduler = DDPMScheduler()
    sample, model_output = randn(0), randn(1)

    def prev(t, seed):
        t = torch.tensor(t) if as_tensor else t
        return scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(seed)).prev_sample

    assert torch.equal(prev(0, 1), prev(0, 2))
    assert not torch.allclose(prev(1, 1), prev(1, 2))


def test_step_outputs():
    scheduler = DDPMScheduler()
    sample, model_output = randn(0), randn(1)
    out = scheduler.step(model_output, 10, sample, generator=torch.Generator().manual_seed(0))
    prev_sample, x0 = scheduler.step(model_output, 10, sample, generator=torch.Generator().manual_seed(0),
                                     return_dict=False)
    assert isinstance(out, DDPMSchedulerOutput)
    assert torch.equal(out.prev_sample, prev_sample) and torch.equal(out.pred_original_sample, x0)
    assert bool((x0.abs() <= 1).all())  # clip_sample=True by default
    float64 = scheduler.step(model_output.double(), 10, sample.double()).prev_sample
    assert float64.dtype == torch.float64


def test_step_traces_into_one_graph():
    """No `.item()`, no branch on a tensor's value: dynamo traces `step` with a tensor timestep into a single graph
    (what a CUDA graph capture needs). diffusers' `step` branches on `t > 0`, and fails the same check."""
    sample = randn(0)

    def compiled_step(scheduler):  # dynamo cannot take a torch.Generator: the noise is unseeded
        step = lambda m, t, x: scheduler.step(m, t, x, return_dict=False)  # noqa: E731
        return torch.compile(step, backend="eager", fullgraph=True, dynamic=False)

    torch._dynamo.reset()
    ours = DDPMScheduler(variance_type="learned_range", thresholding=True)
    ours.set_timesteps(10)
    step = compiled_step(ours)
    for t in ours.timesteps:  # ten timesteps, one compiled graph (the recompile limit is 8)
        model_output = fake_model(sample, t, "learned_range")
        prev_sample, x0 = step(model_output, t, sample)
        expected = ours.step(model_output, t, sample)
        assert torch.equal(x0, expected.pred_original_sample)
        assert torch.equal(prev_sample, expected.prev_sample) == (t == 0)  # noise everywhere but at t = 0
    theirs = reference()
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|dynamic"):
        compiled_step(theirs)(randn(1), torch.tensor(500), sample)
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_loop_never_syncs_on_cuda():
    scheduler = DDPMScheduler(variance_type="learned_range")
    scheduler.set_timesteps(10, device="cuda")
    sample = torch.randn(SHAPE, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in scheduler.timesteps:
            sample = scheduler.step(fake_model(sample, t, "learned_range"), t, sample, generator=generator).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(sample).all()


def test_off_schedule_timesteps():
    """Python ints are checked; tensors are not (that would sync) and give NaN."""
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    sample = randn(0)
    with pytest.raises(ValueError, match="Timestep 5 is not in the schedule .10 timesteps from 900 to 0."):
        scheduler.step(sample, 5, sample)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.previous_timestep(5)
    assert scheduler.step(sample, torch.tensor(5), sample).prev_sample.isnan().all()


@pytest.mark.parametrize("set_timesteps", [None, dict(num_inference_steps=10), dict(timesteps=[999, 600, 30, 0])])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_get_variance_matches_diffusers(variance_type, set_timesteps):
    """diffusers' semi-private `_get_variance`, which its tests and community pipelines call, gives its numbers here,
    also for "fixed_large_log" (log beta_t: only its `step` misuses it), and for a `variance_type` argument."""
    ours, theirs = DDPMScheduler(variance_type=variance_type), reference(variance_type=variance_type)
    theirs.register_to_config(variance_type=variance_type)  # `reference` maps "fixed_large_log" away
    for scheduler in (ours, theirs):
        if set_timesteps:
            scheduler.set_timesteps(**set_timesteps)
    predicted_variance = torch.tanh(randn(0))
    for t in [int(t) for t in theirs.timesteps[::3]] + [0]:
        expected = theirs._get_variance(t, predicted_variance)
        assert_close(ours._get_variance(t, predicted_variance), expected)
        assert_close(ours._get_variance(torch.tensor(t), predicted_variance), expected)
        large = theirs._get_variance(t, variance_type="fixed_large")
        assert_close(ours._get_variance(t, variance_type="fixed_large"), large)


def test_diffusers_instance_attributes():
    ours, theirs = DDPMScheduler(variance_type="fixed_large"), reference(variance_type="fixed_large")
    assert ours.variance_type == theirs.variance_type == "fixed_large"
    with pytest.raises(AttributeError):  # README, "Differences from diffusers": `step` follows the config
        ours.variance_type = "fixed_small"
    assert torch.equal(ours.one, theirs.one) and ours.one.dtype == theirs.one.dtype
    for kwargs, custom in [(dict(num_inference_steps=10), False), (dict(timesteps=[500, 3]), True)]:
        ours.set_timesteps(**kwargs)
        theirs.set_timesteps(**kwargs)
        assert ours.custom_timesteps is theirs.custom_timesteps is custom


@pytest.mark.parametrize("timestep", [999.0, torch.tensor(999.0), torch.tensor([999.0, 500.0])])
def test_float_timesteps_are_a_clear_error(timestep):
    """diffusers raises an IndexError from deep inside `step` for these."""
    sample = randn(0)
    with pytest.raises(ValueError, match="Timesteps index the training schedule and are integers, got"):
        DDPMScheduler().step(sample, timestep, sample)
    with pytest.raises(IndexError):
        reference().step(sample, timestep, sample)


def test_previous_timestep_matches_diffusers():
    ours, theirs = DDPMScheduler(), reference()
    assert ours.previous_timestep(500) == theirs.previous_timestep(500) == 499
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(timesteps=[999, 600, 30])
    assert [int(ours.previous_timestep(t)) for t in ours.timesteps] == [600, 30, -1]
    assert [int(theirs.previous_timestep(t)) for t in theirs.timesteps] == [600, 30, -1]
    assert torch.is_tensor(ours.previous_timestep(torch.tensor(600)))


# ---------------------------------------------------------------------------------------------------------------
# Config, save/load, interchange with diffusers
# ---------------------------------------------------------------------------------------------------------------


def _public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def test_config_keys_and_defaults_match_diffusers():
    ours, theirs = DDPMScheduler(), reference()
    assert _public(ours.config) == _public(theirs.config)
    assert json.loads(ours.to_json_string())["_class_name"] == "DDPMScheduler"
    assert len(ours) == 1000 and ours.init_noise_sigma == 1.0 and ours.order == 1
    sample = randn(0)
    assert ours.scale_model_input(sample, 10) is sample


def test_options_cover_diffusers():
    """Every option value diffusers' signature lists is accepted here (we add "laplace", which its code handles)."""
    theirs = diffusers.DDPMScheduler.__init__.__annotations__
    for name, ours in [("beta_schedule", BetaSchedule), ("variance_type", VarianceType),
                       ("prediction_type", PredictionType), ("timestep_spacing", TimestepSpacing)]:
        assert set(get_args(theirs[name])) <= set(get_args(ours))
    assert set(get_args(BetaSchedule)) == set(BETA_SCHEDULES)


def test_save_and_load_interchange_with_diffusers(tmp_path):
    config = dict(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                  prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    DDPMScheduler(**config).save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMScheduler" and saved["variance_type"] == "learned_range"
    reference(**config).save_pretrained(tmp_path / "theirs")

    for folder in ("ours", "theirs"):
        ours = DDPMScheduler.from_pretrained(tmp_path / folder)
        theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path / folder)
        assert _public(ours.config) == _public(theirs.config)
        assert {key: ours.config[key] for key in config} == config
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_from_config_interchange():
    ours = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    ddim = diffusers.DDIMScheduler.from_config(ours.config)
    assert isinstance(ddim, diffusers.DDIMScheduler)
    assert ddim.config.prediction_type == "v_prediction" and torch.equal(ddim.alphas_cumprod, ours.alphas_cumprod)

    theirs = reference(beta_schedule="sigmoid", timestep_spacing="linspace")
    assert _public(DDPMScheduler.from_config(theirs.config).config) == _public(theirs.config)
    # A DDIM config carries keys DDPM does not know (set_alpha_to_one, ...): from_config ignores them.
    from_ddim = DDPMScheduler.from_config(ddim.config)
    assert from_ddim.config.beta_schedule == "scaled_linear" and "set_alpha_to_one" not in from_ddim.config


def test_compatibles_are_diffusers_karras_schedulers():
    names = {cls.__name__ for cls in DDPMScheduler().compatibles}
    assert names == {e.name for e in KarrasDiffusionSchedulers}
    assert diffusers.EulerDiscreteScheduler in DDPMScheduler().compatibles


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=0), "between 1 and num_train_timesteps=1000, got 0"),
    (dict(num_inference_steps=-3), "between 1 and num_train_timesteps=1000, got -3"),
    (dict(num_inference_steps=1001), "between 1 and num_train_timesteps=1000, got 1001"),
    (dict(num_inference_steps=10, timesteps=[9, 0]), "not both"),
    (dict(), "got neither"),
    (dict(timesteps=[10, 20]), r"strictly descending, got \[10, 20\]"),
    (dict(timesteps=[50, 50, 0]), "strictly descending"),
    (dict(timesteps=[1000, 5]), r"must lie in \[0, num_train_timesteps=1000\), got \[1000, 5\]"),
    (dict(timesteps=[5, -1]), r"must lie in \[0, num_train_timesteps=1000\), got \[5, -1\]"),
    (dict(timesteps=[]), "non-empty"),
])
def test_set_timesteps_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMScheduler().set_timesteps(**kwargs)


def test_steps_offset_past_the_last_timestep_is_rejected():
    with pytest.raises(ValueError, match="With steps_offset=1, 1000 steps start at timestep 1000, past "
                                         "num_train_timesteps - 1 = 999"):
        DDPMScheduler(steps_offset=1).set_timesteps(1000)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_schedule="cosine"), "Unknown beta_schedule 'cosine'; choose one of 'linear', 'scaled_linear', "),
    (dict(variance_type="small"), "Unknown variance_type 'small'; choose one of 'fixed_small', "),
    (dict(prediction_type="noise"), "Unknown prediction_type 'noise'; choose one of 'epsilon', 'sample', "
                                    "'v_prediction'"),
    (dict(timestep_spacing="uniform"), "Unknown timestep_spacing 'uniform'; choose one of 'linspace', "),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas has 2 values but num_train_timesteps is 1000"),
])
def test_constructor_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMScheduler(**kwargs)


def test_unknown_option_is_a_type_error_as_in_diffusers():
    for scheduler_class in (DDPMScheduler, diffusers.DDPMScheduler):
        with pytest.raises(TypeError, match="unexpected keyword argument 'num_train_timestep'"):
            scheduler_class(num_train_timestep=10)


@pytest.mark.parametrize("variance_type, channels, message", [
    ("fixed_small", 4, r"shape \(2, 4, 4, 4\) for a sample of shape \(2, 3, 4, 4\); expected \(2, 3, 4, 4\)"),
    ("fixed_small", 6, "it must match the sample"),
    ("learned", 3, r"expected \(2, 6, 4, 4\): variance_type='learned' needs the prediction and the variance"),
    ("learned_range", 3, "twice the channels of the sample"),
])
def test_step_rejects_mismatched_model_output(variance_type, channels, message):
    sample = randn(0)
    with pytest.raises(ValueError, match=message):
        DDPMScheduler(variance_type=variance_type).step(randn(1, (2, channels, 4, 4)), 10, sample)
