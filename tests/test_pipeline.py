"""DDPMPipeline: parity with diffusers' pipeline, outputs, callbacks and other schedulers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, ModelMixin, ConfigMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler

from helpers import as_diffusers, make_pipeline, sample


@pytest.mark.parametrize("scheduler_kwargs", [{}, {"variance_type": "fixed_large", "prediction_type": "v_prediction"}])
def test_same_images_as_diffusers_pipeline(tiny_unet_config, scheduler_kwargs):
    pipe = make_pipeline(tiny_unet_config, **scheduler_kwargs)
    ours = sample(pipe, batch_size=3)
    theirs = sample(as_diffusers(pipe), batch_size=3)
    assert ours.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert np.abs(ours - sample(pipe, seed=1, batch_size=3)).max() > 0.01  # the seed matters


def test_output_types(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    pil = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    arr = sample(pipe, batch_size=2, num_inference_steps=5)
    pt = pipe(batch_size=2, num_inference_steps=5, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and all(isinstance(image, Image.Image) and image.size == (8, 8) for image in pil)
    assert arr.shape == (2, 8, 8, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert pt.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    (images,) = pipe(num_inference_steps=2, return_dict=False)
    assert len(images) == 1


def test_grayscale_images_are_single_channel_pil(tiny_unet_config):
    pipe = make_pipeline({**tiny_unet_config, "in_channels": 1, "out_channels": 1})
    image = pipe(num_inference_steps=2).images[0]
    assert image.mode == "L" and image.size == (8, 8)


def test_non_square_sample_size(tiny_unet_config):
    pipe = make_pipeline({**tiny_unet_config, "sample_size": (8, 16)})
    assert sample(pipe, num_inference_steps=2).shape == (1, 8, 16, 3)


def test_a_generator_per_image_reproduces_each_image_alone(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    batch = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                 num_inference_steps=10, output_type="np").images
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(6)], num_inference_steps=10,
                 output_type="np").images
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)


def test_callback_sees_every_step_and_can_replace_the_sample(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    seen = []

    def collect(pipeline, step_index, timestep, state):
        assert pipeline is pipe
        seen.append((step_index, int(timestep), state["sample"].clone(), state["pred_original_sample"].shape))

    final = pipe(num_inference_steps=8, output_type="pt", callback_on_step_end=collect,
                 generator=torch.Generator().manual_seed(0)).images
    assert [s[0] for s in seen] == list(range(8))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert seen[0][3] == (1, 3, 8, 8)
    torch.testing.assert_close(final, (seen[-1][2] / 2 + 0.5).clamp(0, 1))

    def zero_at_the_end(pipeline, step_index, timestep, state):
        return {"sample": torch.zeros_like(state["sample"])} if step_index == 7 else None

    replaced = pipe(num_inference_steps=8, output_type="np", callback_on_step_end=zero_at_the_end).images
    np.testing.assert_allclose(replaced, 0.5)


class PointMassDenoiser(ModelMixin, ConfigMixin):
    """The exact noise predictor for data that is a single image `value` everywhere.

    For x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with x_0 = value, the noise is known in closed
    form, so any correctly driven sampler must end at `value`. Timesteps may be fractional (Euler),
    so abar_t is interpolated the way Euler interpolates sigmas.
    """

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 3, value: float = 0.25):
        super().__init__()
        alphas_cumprod = DDPMScheduler().alphas_cumprod.double()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt(), persistent=False)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype and device

    def forward(self, sample, timestep):
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, 999)
        low = t.floor().long()
        high = (low + 1).clamp(max=999)
        sigma = torch.lerp(self.sigmas[low], self.sigmas[high], t - low)
        alpha_bar = 1 / (1 + sigma**2)
        eps = (sample.double() - alpha_bar.sqrt() * self.config.value) / (1 - alpha_bar).sqrt()
        return UNet2DOutput(sample=eps.to(sample.dtype))


@pytest.mark.parametrize(
    "scheduler_class", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]
)
def test_other_schedulers_drive_the_sampler_correctly(scheduler_class):
    base = DDPMScheduler(clip_sample=False)
    scheduler = scheduler_class.from_config(base.config)
    pipe = DDPMPipeline(unet=PointMassDenoiser(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=25, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    # value 0.25 in [-1, 1] is 0.625 in [0, 1].
    torch.testing.assert_close(images, torch.full_like(images, 0.625), atol=2e-3, rtol=0)


def test_euler_needs_the_input_scaling_the_pipeline_applies():
    """Without scale_model_input / init_noise_sigma, Euler would be far off: the test above can fail."""
    scheduler = EulerDiscreteScheduler.from_config(DDPMScheduler().config)
    assert scheduler.init_noise_sigma > 10
    scheduler.set_timesteps(25)
    sample = torch.ones(1, 3, 8, 8)
    assert not torch.allclose(scheduler.scale_model_input(sample, scheduler.timesteps[0]), sample)


def test_bad_call_arguments_are_clear_errors(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(num_inference_steps=2, output_type="jpeg")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pipe(batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="one per image"):
        pipe(batch_size=3, generator=[torch.Generator()], num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=1001)


def test_bfloat16_sampling(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config).to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    images = sample(pipe, num_inference_steps=10)
    reference = sample(make_pipeline(tiny_unet_config), num_inference_steps=10)
    assert np.isfinite(images).all()
    assert np.abs(images - reference).mean() < 0.05
