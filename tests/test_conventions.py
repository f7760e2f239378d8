"""diffusers' conventions on ddpm_hf's classes: config round trips and files, and what ModelMixin users call.

For every UNet config of the parity tests and every option value of the scheduler's grid:
`from_pretrained(save_pretrained(x)).config == x.config`, and the saved JSON is the one diffusers writes for the
same object. Then the ModelMixin methods diffusers users rely on, run on ddpm_hf's UNet against diffusers' own.
"""

import inspect
import json
import logging
from typing import get_args

import diffusers
import numpy as np
import pytest
import torch

import ddpm_hf
from ddpm_hf import DDPMScheduler, UNet2DModel
from ddpm_hf.schedulers.scheduling_ddpm import BetaSchedule, PredictionType, TimestepSpacing, VarianceType

from helpers import CIFAR10_CONFIG, PARITY_CONFIGS, TRAIN_UNCONDITIONAL_CONFIG, make_inputs, make_pipeline, tiny

# The option values of tests/test_scheduler.py's parity grid, each in one config (the grid is their product: 2160
# configs, 30 s of saving and loading that would test the same keys again), and the custom schedules.
SCHEDULER_CONFIGS = [
    {option: value}
    for option, values in [("beta_schedule", get_args(BetaSchedule)), ("variance_type", get_args(VarianceType)),
                           ("prediction_type", get_args(PredictionType)),
                           ("timestep_spacing", get_args(TimestepSpacing)), ("clip_sample", (True, False)),
                           ("thresholding", (False, True)), ("rescale_betas_zero_snr", (False, True))]
    for value in values
] + [
    dict(steps_offset=1, clip_sample_range=2.0, sample_max_value=3.0, dynamic_thresholding_ratio=0.9),
    dict(trained_betas=np.linspace(1e-3, 0.05, 100).tolist(), num_train_timesteps=100, beta_start=0.001),
    dict(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
         prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True, beta_end=0.01),
]


def saved_json(folder, name: str) -> dict:
    return json.loads((folder / name).read_text())


def as_json(config, private: bool = False) -> dict:
    """A config's public keys (or its private ones, `_class_name`, ...) as its JSON file holds them (tuples become
    lists)."""
    keys = {key: value for key, value in dict(config).items() if key.startswith("_") is private}
    return json.loads(json.dumps(keys, default=lambda value: getattr(value, "tolist", lambda: str(value))()))


def assert_round_trip(ours, theirs, tmp_path, file_name: str) -> None:
    """ours' saved file is diffusers' for the same object, and reloads to the same config; the private keys
    ConfigMixin adds on the way (`_class_name`, ...) are those diffusers' reloaded config has (`_name_or_path` aside:
    the folder each was loaded from)."""
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert saved_json(tmp_path / "ours", file_name) == saved_json(tmp_path / "theirs", file_name)
    reloaded = type(ours).from_pretrained(tmp_path / "ours")
    their_reloaded = type(theirs).from_pretrained(tmp_path / "theirs")
    assert as_json(reloaded.config) == as_json(ours.config)
    private, their_private = as_json(reloaded.config, private=True), as_json(their_reloaded.config, private=True)
    assert "_use_default_values" not in private
    assert private.keys() == their_private.keys()
    assert {k: v for k, v in private.items() if k != "_name_or_path"} == {
        k: v for k, v in their_private.items() if k != "_name_or_path"}


@pytest.mark.parametrize("config", SCHEDULER_CONFIGS, ids=str)
def test_scheduler_config_round_trip(config, tmp_path):
    assert_round_trip(DDPMScheduler(**config), diffusers.DDPMScheduler(**config), tmp_path, "scheduler_config.json")
    assert "_use_default_values" not in DDPMScheduler.from_pretrained(tmp_path / "ours").config


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_unet_config_round_trip(name, tmp_path):
    config = PARITY_CONFIGS[name]
    assert_round_trip(UNet2DModel(**config), diffusers.UNet2DModel(**config), tmp_path, "config.json")


@pytest.mark.parametrize("config", [CIFAR10_CONFIG, TRAIN_UNCONDITIONAL_CONFIG], ids=["cifar10", "train_unconditional"])
def test_large_unet_config_round_trip(config, tmp_path):
    """The same for the 36M- and 114M-parameter networks, without writing their weights: `from_pretrained` reads the
    config through `load_config` and `from_config`, which this runs, on the meta device."""
    with torch.device("meta"):
        ours, theirs = UNet2DModel(**config), diffusers.UNet2DModel(**config)
        ours.save_config(tmp_path / "ours")
        theirs.save_config(tmp_path / "theirs")
        assert saved_json(tmp_path / "ours", "config.json") == saved_json(tmp_path / "theirs", "config.json")
        reloaded = UNet2DModel.from_config(UNet2DModel.load_config(tmp_path / "ours"))
    assert as_json(reloaded.config) == as_json(ours.config)


def test_pipeline_files_match_diffusers(tiny_unet_config, tmp_path):
    pipe = make_pipeline(tiny_unet_config)
    assert_round_trip(pipe, diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**tiny_unet_config),
                                                   scheduler=diffusers.DDPMScheduler()), tmp_path, "model_index.json")


# --- ModelMixin conventions ---


@pytest.fixture
def models() -> tuple[UNet2DModel, diffusers.UNet2DModel]:
    """ddpm_hf's UNet and diffusers', with the same weights, in eval mode."""
    config = tiny()
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config).eval()
    ours = UNet2DModel(**config).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def outputs(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(tiny()) | kwargs).sample


def test_size_dtype_device_and_footprint_as_in_diffusers(models):
    ours, theirs = models
    for kwargs in (dict(), dict(only_trainable=True), dict(exclude_embeddings=True)):
        assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs)
    assert ours.get_memory_footprint() == theirs.get_memory_footprint()
    assert (ours.dtype, ours.device) == (theirs.dtype, theirs.device) == (torch.float32, torch.device("cpu"))
    ours.to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16


@pytest.mark.parametrize("enable", ["enable_gradient_checkpointing", "disable_gradient_checkpointing"])
def test_gradient_checkpointing_flag(models, enable):
    for model in models:
        getattr(model, enable)()
    assert models[0].is_gradient_checkpointing == models[1].is_gradient_checkpointing == enable.startswith("enable")


def test_layerwise_casting_gives_diffusers_outputs(models):
    """fp8 storage, fp32 compute (diffusers' enable_layerwise_casting), norms kept as they are in both."""
    reference = outputs(models[0])
    for model in models:
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    ours, theirs = outputs(models[0]), outputs(models[1])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - reference).abs().max() > 1e-4  # the weights really went through fp8


def test_group_offload_gives_the_same_outputs(models):
    reference = outputs(models[0])
    models[0].enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    torch.testing.assert_close(outputs(models[0]), reference, atol=0, rtol=0)


@pytest.mark.parametrize("enable", ["enable_xformers_memory_efficient_attention", "enable_npu_flash_attention",
                                    "enable_xla_flash_attention"])
def test_other_attention_kernels_keep_sdpa_and_say_so(models, enable, caplog):
    """ddpm_hf's attention is always torch's scaled_dot_product_attention (README, "Differences from diffusers")."""
    ours = models[0]
    reference = outputs(ours)
    with caplog.at_level(logging.WARNING):
        getattr(ours, enable)()
    assert "scaled_dot_product_attention" in caplog.text
    torch.testing.assert_close(outputs(ours), reference, atol=0, rtol=0)
    getattr(ours, enable.replace("enable", "disable"))()  # a no-op, as there is nothing to switch back


def test_native_attention_backend_as_in_diffusers(models):
    reference = outputs(models[1])
    for model in models:
        model.set_attention_backend("native")
    torch.testing.assert_close(outputs(models[0]), reference, atol=1e-5, rtol=0)
    models[0].reset_attention_backend()


@pytest.mark.parametrize("name", ["set_default_attn_processor", "fuse_qkv_projections", "attn_processors"])
def test_attention_processor_api_is_absent_in_both(name):
    """diffusers' UNet2DModel has no attention-processor API (README: SDPA is what its default processor runs)."""
    assert not hasattr(diffusers.UNet2DModel, name) and not hasattr(UNet2DModel, name)


@pytest.mark.parametrize(("class_name", "method"), [
    ("UNet2DModel", "push_to_hub"), ("UNet2DModel", "save_pretrained"), ("DDPMScheduler", "from_pretrained"),
    ("DDPMScheduler", "push_to_hub"), ("DDPMPipeline", "save_pretrained"),
])
def test_saving_and_pushing_are_diffusers_own_code(class_name, method):
    """Inherited, or (DDPMPipeline.save_pretrained, which writes the measured fast sampler first) a wrapper that
    calls diffusers' own method and has its signature."""
    ours, theirs = getattr(ddpm_hf, class_name), getattr(diffusers, class_name)
    our_method, their_method = inspect.getattr_static(ours, method), inspect.getattr_static(theirs, method)
    if inspect.isfunction(our_method) and our_method is not their_method:
        our_method = our_method.__wrapped__
    assert our_method is their_method
    assert inspect.signature(getattr(ours, method)) == inspect.signature(getattr(theirs, method))
