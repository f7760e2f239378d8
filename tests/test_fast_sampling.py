"""DDPMPipeline.enable_fast_sampling: the plain images at fp32, close ones in bf16, eager when compiling fails."""

import numpy as np
import pytest
import torch

from helpers import make_pipeline, sample

# The smallest UNet with every kind of layer (ResNet, attention, resamplers), to keep compiling on a CPU short.
COMPILE_UNET_CONFIG = dict(
    sample_size=8,
    block_out_channels=(8, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    mid_block_type=None,
    norm_num_groups=4,
    attention_head_dim=4,
)


def test_fp32_settings_give_the_plain_images(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    plain = sample(pipe, batch_size=2)
    pipe.enable_fast_sampling(dtype=None, channels_last=True, compile=False)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(sample(pipe, batch_size=2), plain, atol=1e-5, rtol=0)


def test_bf16_autocast_stays_close(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    plain = sample(pipe, batch_size=2)
    pipe.enable_fast_sampling(dtype=torch.bfloat16, compile=False)
    fast = pipe(batch_size=2, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert fast.images.dtype == torch.float32  # the sample and the scheduler step stay in the weights' dtype
    difference = np.abs(fast.images.permute(0, 2, 3, 1).numpy() - plain)
    assert 1e-4 < difference.max() < 0.1 and difference.mean() < 0.01


def test_disable_restores_the_plain_path(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    plain = sample(pipe)
    pipe.enable_fast_sampling(compile=False)
    pipe.disable_fast_sampling()
    assert pipe.fast_sampling is None and pipe.unet.conv_in.weight.is_contiguous()
    np.testing.assert_array_equal(sample(pipe), plain)


@pytest.mark.parametrize("fast", [False, True])
def test_a_step_never_syncs_with_the_host(tiny_unet_config, fast):
    """A full graph with no break: no `.item()`, no `nonzero`, no branching on tensor values in UNet or step."""
    pipe = make_pipeline(tiny_unet_config)
    if fast:
        pipe.enable_fast_sampling(compile=False)
    pipe.scheduler.set_timesteps(10)
    step = pipe._denoising_step(torch.device("cpu"), generator=None)
    sample_, timestep = torch.randn(2, 3, 8, 8), pipe.scheduler.timesteps[3]
    torch.manual_seed(0)
    eager = step(sample_, timestep).prev_sample
    torch.manual_seed(0)
    traced = torch.compile(step, backend="eager", fullgraph=True)(sample_, timestep).prev_sample
    torch.testing.assert_close(traced, eager)


def test_compiled_unet_gives_the_plain_images_and_follows_weight_changes():
    torch._dynamo.reset()
    pipe = make_pipeline(COMPILE_UNET_CONFIG)
    plain = sample(pipe, batch_size=2, num_inference_steps=5)
    pipe.enable_fast_sampling(dtype=None, channels_last=True, compile=True)
    np.testing.assert_allclose(sample(pipe, batch_size=2, num_inference_steps=5), plain, atol=1e-5, rtol=0)
    assert pipe._compiled_unet.compiled is not None  # it did compile, rather than fall back

    with torch.no_grad():  # the compiled graph holds the weights as constants: an in-place change must reach it
        pipe.unet.conv_out.bias.add_(0.5)
    changed = sample(pipe, batch_size=2, num_inference_steps=5)
    pipe.disable_fast_sampling()
    np.testing.assert_allclose(changed, sample(pipe, batch_size=2, num_inference_steps=5), atol=1e-5, rtol=0)
    assert np.abs(changed - plain).max() > 0.01


def test_compile_failure_warns_and_samples_eagerly():
    torch._dynamo.reset()  # no compiled graph to reuse: compiling must really run, and fail
    pipe = make_pipeline(COMPILE_UNET_CONFIG)
    plain = sample(pipe, num_inference_steps=5)
    pipe.enable_fast_sampling(dtype=None, channels_last=False, compile=True)
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",)}  # what a machine without a C++ compiler looks like to inductor
    with torch._inductor.config.patch(no_compiler), pytest.warns(RuntimeWarning, match="torch.compile failed"):
        images = sample(pipe, num_inference_steps=5)
    np.testing.assert_array_equal(images, plain)
    assert pipe._compiled_unet.compiled is None  # for good: the next call does not try again


def test_bad_flags_raise(tiny_unet_config):
    pipe = make_pipeline(tiny_unet_config)
    with pytest.raises(ValueError, match="dtype must be"):
        pipe.enable_fast_sampling(dtype=torch.int8)
    with pytest.raises(ValueError, match="compile must be True or False"):
        pipe.enable_fast_sampling(compile="yes")
    with pytest.raises(ValueError, match="cuda_graph must be"):
        pipe.enable_fast_sampling(cuda_graph="auto")
    with pytest.raises(TypeError, match="unexpected keyword argument 'fp16'"):
        pipe.enable_fast_sampling(fp16=True)
    assert pipe.fast_sampling is None

    pipe.enable_fast_sampling(compile=False, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True, but the pipeline runs on cpu"):
        pipe(num_inference_steps=2)
