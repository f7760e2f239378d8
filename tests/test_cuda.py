"""ddpm_hf on the device where users run it: parity with diffusers, the CUDA-graph step, low-precision training.

Every test here is marked `cuda`: `benchmarks/gpu/suite.py` runs them with `pytest -m cuda` on a GPU. Tests that
take a `device` run on the CPU too (so they cannot rot between GPU loans); the rest need CUDA and skip without it.
"""

from __future__ import annotations

import contextlib
import itertools

import diffusers
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel
from ddpm_hf.pipelines.fast_sampling import CUDAGraphStep
from ddpm_hf.training import DataConfig, TrainData, TrainingConfig
from ddpm_hf.training.loop import build, make_accelerator, optimizer_step

from helpers import CIFAR10_CONFIG, as_diffusers

pytestmark = pytest.mark.cuda
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

# Small, but with every layer kind (ResNet, attention, both resamplers); 16 px.
SMALL_CONFIG = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=8)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request) -> torch.device:
    return torch.device(request.param)


@contextlib.contextmanager
def true_fp32():
    """Float32 without TF32 (cuDNN convolutions use TF32 by default): the precision diffusers' numbers are taken at."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def twins(config: dict, device: torch.device) -> tuple[UNet2DModel, diffusers.UNet2DModel]:
    torch.manual_seed(0)
    ours = UNet2DModel(**config).eval()
    theirs = diffusers.UNet2DModel.from_config(ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device), theirs.to(device)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_unet_matches_diffusers(device, dtype):
    """fp32: within 1e-4 of diffusers (max abs). bf16/fp16: as close to the fp32 output as diffusers' own UNet
    in that dtype is (relative error at most 1.25x diffusers', and under 2e-2)."""
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("float16 convolutions are a GPU format")
    config = CIFAR10_CONFIG if device.type == "cuda" else SMALL_CONFIG
    ours, theirs = twins(config, device)
    size = config["sample_size"]
    sample = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    timesteps = torch.tensor([0, 10, 500, 999], device=device)
    with torch.no_grad(), true_fp32():
        reference = theirs(sample, timesteps).sample
        if dtype == torch.float32:
            difference = (ours(sample, timesteps).sample - reference).abs().max().item()
            assert difference < 1e-4
            return
        ours_low = ours.to(dtype)(sample.to(dtype), timesteps).sample
        theirs_low = theirs.to(dtype)(sample.to(dtype), timesteps).sample
    assert ours_low.dtype == dtype
    ours_error, theirs_error = relative_error(ours_low, reference), relative_error(theirs_low, reference)
    assert ours_error < 2e-2 and ours_error <= 1.25 * theirs_error + 1e-4, (ours_error, theirs_error)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_scheduler_step_matches_diffusers_with_a_seeded_generator(device, variance_type):
    ours = DDPMScheduler(variance_type=variance_type)
    theirs = diffusers.DDPMScheduler(variance_type=variance_type)
    ours.set_timesteps(50, device=device)
    theirs.set_timesteps(50, device=device)
    channels = 6 if variance_type == "learned_range" else 3
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    for index in (0, 25, 49):  # high noise, the middle, the last step (no noise)
        t = ours.timesteps[index]
        model_output = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(index)).to(device)
        if variance_type == "learned_range":
            model_output[:, 3:] = model_output[:, 3:].tanh()  # a predicted interpolation in [-1, 1]
        expected = theirs.step(model_output, int(t), sample, generator=torch.Generator(device).manual_seed(7))
        actual = ours.step(model_output, t, sample, generator=torch.Generator(device).manual_seed(7))
        torch.testing.assert_close(actual.pred_original_sample, expected.pred_original_sample, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(actual.prev_sample, expected.prev_sample, atol=1e-5, rtol=1e-5)


def test_pipeline_gives_diffusers_images_with_a_seeded_generator(device):
    torch.manual_seed(0)
    pipe = DDPMPipeline(unet=UNet2DModel(**SMALL_CONFIG).eval(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    reference = as_diffusers(pipe)
    pipe.to(device), reference.to(device)
    with true_fp32():
        ours = pipe(batch_size=3, num_inference_steps=20, generator=torch.Generator(device).manual_seed(0),
                    output_type="np").images
        theirs = reference(batch_size=3, num_inference_steps=20, generator=torch.Generator(device).manual_seed(0),
                           output_type="np").images
    assert np.abs(ours - theirs).max() < 1e-4


def training_run(tmp_path, device: torch.device, mixed_precision: str):
    AcceleratorState._reset_state(reset_partial_state=True)  # each test sets its own mixed precision
    config = TrainingConfig(data=DataConfig(resolution=16), train_batch_size=8, mixed_precision=mixed_precision,
                            learning_rate=1e-3, lr_warmup_steps=0, use_ema=False, logger="none",
                            output_dir=str(tmp_path), model_config="tiny")
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = TrainData(dataset=torch.utils.data.TensorDataset(images), num_channels=3, num_examples=8, name="fixed")
    unet_config = dict(SMALL_CONFIG, in_channels=3, out_channels=3)
    if device.type == "cpu":
        # `make_accelerator` picks the GPU where there is one: hide it for the CPU variant.
        return _on_cpu(lambda: build(config, make_accelerator(config), data, unet_config, max_train_steps=100)), images
    return build(config, make_accelerator(config), data, unet_config, max_train_steps=100), images


def _on_cpu(function):
    import os

    saved = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        return function()
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_USE_CPU")
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved


def fixed_loss(run, images: torch.Tensor) -> float:
    """The loss on a fixed batch, fixed noise and fixed timesteps, without dropout: what training should lower."""
    unet = run.unet.eval()
    device = run.accelerator.device
    generator = torch.Generator().manual_seed(123)
    clean = images.to(device)
    noise = torch.randn(clean.shape, generator=generator).to(device)
    timesteps = torch.linspace(0, 999, len(clean)).long().to(device)
    with torch.no_grad(), run.accelerator.autocast():
        prediction = unet(run.noise_scheduler.add_noise(clean, noise, timesteps), timesteps).sample
    unet.train()
    return torch.nn.functional.mse_loss(prediction.float(), noise).item()


@pytest.mark.parametrize("mixed_precision", ["bf16", pytest.param("fp16", marks=needs_cuda)])
def test_a_low_precision_training_step_lowers_the_loss(tmp_path, mixed_precision):
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    run, images = training_run(tmp_path, device, mixed_precision)
    assert run.accelerator.mixed_precision == mixed_precision
    if mixed_precision == "fp16":
        assert run.accelerator.scaler is not None  # fp16 trains with a GradScaler
    before = fixed_loss(run, images)
    losses = [optimizer_step(run, itertools.repeat(images))[0].item() for _ in range(30)]
    after = fixed_loss(run, images)
    assert np.isfinite(losses).all()
    assert after < 0.8 * before, (before, after)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_adamw_is_fused_exactly_on_cuda(tmp_path, device):
    run, _ = training_run(tmp_path, device, "no")
    assert run.accelerator.device.type == device.type
    assert bool(run.optimizer.optimizer.defaults.get("fused")) == (device.type == "cuda")
    AcceleratorState._reset_state(reset_partial_state=True)


# The graph and compile tests last: on a GPU they take longest (compiling), so a tight budget cuts them first.


def cuda_pipeline() -> DDPMPipeline:
    torch.manual_seed(0)
    pipe = DDPMPipeline(unet=UNet2DModel(**SMALL_CONFIG).eval(), scheduler=DDPMScheduler()).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SyncErrorsAfterCapture:
    """A step callback that turns every host-device sync into an error once the CUDA graph has been captured (the
    steps after the eager warm-up), and back at the last step; it also counts the steps it saw."""

    def __init__(self, num_steps: int):
        self.num_steps, self.steps = num_steps, 0

    def __call__(self, pipe, step_index, timestep, state):
        self.steps += 1
        if step_index == CUDAGraphStep.warmup_steps:  # the capture happened in this step
            torch.cuda.set_sync_debug_mode("error")
        if step_index == self.num_steps - 1:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_step_gives_the_eager_images_and_never_syncs(compile):
    """fp32 (no autocast): the replayed graph computes what the eager loop computes, from the same CUDA generator,
    and no step after the capture synchronises with the host (set_sync_debug_mode("error") would raise)."""
    if compile:
        torch._dynamo.reset()
    plain, fast = cuda_pipeline(), cuda_pipeline()
    fast.enable_fast_sampling(dtype=None, channels_last=False, compile=compile, cuda_graph=True)
    generator = torch.Generator("cuda").manual_seed(0)
    assert isinstance(fast._denoising_step(torch.device("cuda"), generator), CUDAGraphStep)
    steps = 12
    watch = SyncErrorsAfterCapture(steps)
    try:
        graphed = fast(batch_size=4, num_inference_steps=steps, generator=generator, output_type="pt",
                       callback_on_step_end=watch).images
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = plain(batch_size=4, num_inference_steps=steps, generator=torch.Generator("cuda").manual_seed(0),
                  output_type="pt").images
    assert watch.steps == steps
    assert (graphed - eager).abs().max().item() < (1e-5 if not compile else 1e-3)


@needs_cuda
def test_fast_sampling_in_fp16_stays_close_to_fp32():
    torch._dynamo.reset()
    plain, fast = cuda_pipeline(), cuda_pipeline()
    fast.enable_fast_sampling(dtype=torch.float16)
    kwargs = dict(batch_size=4, num_inference_steps=12, output_type="pt")
    images = fast(generator=torch.Generator("cuda").manual_seed(0), **kwargs).images
    reference = plain(generator=torch.Generator("cuda").manual_seed(0), **kwargs).images
    assert fast._compiled_unet.compiled is not None  # it compiled rather than fell back
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert (images - reference).abs().mean().item() < 0.02
