"""ddpm_hf's UNet2DModel against diffusers.UNet2DModel: weights, numerics, loading and options."""

import inspect
import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm_hf.models import UNet2DModel, convert_legacy_attention_keys

from helpers import (
    CIFAR10_CONFIG,
    CIFAR10_NUM_PARAMETERS,
    PARITY_CONFIGS,
    TINY_CONFIGS,
    TRAIN_UNCONDITIONAL_CONFIG,
    make_inputs,
    tiny,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def same_weights_as(theirs: diffusers.UNet2DModel, config: dict) -> UNet2DModel:
    """Our UNet, in eval mode, carrying diffusers' (random) weights."""
    ours = UNet2DModel(**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def parameter_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def constructor_config(model: UNet2DModel) -> dict:
    """The constructor arguments recorded in a model's config, as config.json stores them."""
    return json.loads(json.dumps({key: value for key, value in model.config.items() if not key.startswith("_")}))


def max_abs_difference(ours: UNet2DModel, theirs: diffusers.UNet2DModel, inputs: dict) -> float:
    with torch.no_grad():
        return (ours(**inputs).sample - theirs(**inputs).sample).abs().max().item()


@pytest.fixture(scope="module")
def cifar10_models() -> tuple[UNet2DModel, diffusers.UNet2DModel]:
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**CIFAR10_CONFIG).eval()
    return same_weights_as(theirs, CIFAR10_CONFIG), theirs


@pytest.fixture
def tiny_model() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**tiny()).eval()


# --- Parity with diffusers ---


def test_constructor_has_diffusers_config_keys_and_defaults():
    ours = inspect.signature(UNet2DModel.__init__).parameters
    theirs = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    assert {name: p.default for name, p in ours.items()} == {name: p.default for name, p in theirs.items()}


def test_cifar10_architecture(cifar10_models):
    ours, theirs = cifar10_models
    assert sum(p.numel() for p in ours.parameters()) == CIFAR10_NUM_PARAMETERS
    assert parameter_shapes(ours) == parameter_shapes(theirs)
    assert max_abs_difference(ours, theirs, make_inputs(CIFAR10_CONFIG, batch_size=1)) < 1e-5


def test_train_unconditional_architecture():
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**TRAIN_UNCONDITIONAL_CONFIG).eval()
    ours = same_weights_as(theirs, TRAIN_UNCONDITIONAL_CONFIG)
    assert parameter_shapes(ours) == parameter_shapes(theirs)
    assert max_abs_difference(ours, theirs, make_inputs(TRAIN_UNCONDITIONAL_CONFIG, batch_size=1)) < 1e-5


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_state_dicts_load_both_ways(name):
    config = PARITY_CONFIGS[name]
    ours, theirs = UNet2DModel(**config), diffusers.UNet2DModel(**config)
    assert parameter_shapes(ours) == parameter_shapes(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_output_matches_diffusers(name):
    config = PARITY_CONFIGS[name]
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config).eval()
    ours = same_weights_as(theirs, config)
    inputs = make_inputs(config)
    with torch.no_grad():
        output = ours(**inputs).sample
    assert output.shape == (2, config.get("out_channels", 3), *inputs["sample"].shape[-2:])
    assert max_abs_difference(ours, theirs, inputs) < 1e-5


# --- forward() ---


def test_timestep_forms_agree(tiny_model):
    sample = make_inputs(tiny())["sample"]
    with torch.no_grad():
        timestep_forms = (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7]), torch.tensor([7.0, 7.0]))
        outputs = [tiny_model(sample, timestep).sample for timestep in timestep_forms]
        other_timestep = tiny_model(sample, 8).sample
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0])
    assert not torch.allclose(other_timestep, outputs[0])


def test_python_float_timesteps_are_not_truncated(tiny_model):
    """README, "Differences from diffusers": diffusers turns a Python number into an int64 tensor (7.5 -> 7)."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**tiny()).eval()
    sample = make_inputs(tiny())["sample"]
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(sample, 7.5).sample, tiny_model(sample, torch.tensor(7.5)).sample)
        assert not torch.allclose(tiny_model(sample, 7.5).sample, tiny_model(sample, 7).sample)
        assert torch.equal(theirs(sample, 7.5).sample, theirs(sample, 7).sample)


def test_return_dict_false_gives_tuple(tiny_model):
    inputs = make_inputs(tiny())
    with torch.no_grad():
        output = tiny_model(**inputs, return_dict=False)
        expected = tiny_model(**inputs).sample
    assert isinstance(output, tuple) and len(output) == 1
    torch.testing.assert_close(output[0], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_close_to_float32(tiny_model, dtype):
    inputs = make_inputs(tiny())
    with torch.no_grad():
        reference = tiny_model(**inputs).sample
        tiny_model.to(dtype)
        output = tiny_model(inputs["sample"].to(dtype), inputs["timestep"]).sample
    assert output.dtype == dtype
    assert (output.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_channels_last_gives_same_output(tiny_model):
    inputs = make_inputs(tiny())
    with torch.no_grad():
        reference = tiny_model(**inputs).sample
        tiny_model.to(memory_format=torch.channels_last)
        output = tiny_model(inputs["sample"].to(memory_format=torch.channels_last), inputs["timestep"]).sample
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [
    tiny(block_out_channels=(8, 16), norm_num_groups=4),
    tiny(block_out_channels=(32, 32), norm_num_groups=None, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
         up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), sample_size=8),
], ids=["DDPM", "NCSN++"])
def test_gradient_checkpointing_recomputes_and_gives_same_gradients(config):
    torch.manual_seed(0)
    model = UNet2DModel(**config).train()
    inputs = make_inputs(config)
    # A pre-hook, because recomputation stops early, as soon as the saved tensors are restored.
    calls = []
    for name, module in model.named_modules():
        if name.endswith(("resnets.0", "mid_block.attentions.0")):
            module.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    expected = gradients()
    calls_without_checkpointing = len(calls)
    model.enable_gradient_checkpointing()
    calls.clear()
    actual = gradients()

    blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
    assert all(block.gradient_checkpointing for block in blocks)
    assert len(calls) == 2 * calls_without_checkpointing  # forward, then recomputed in backward
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_forward_has_no_data_dependent_control_flow():
    """torch.export fails on `.item()` or on branching on tensor values, which would also sync the device."""
    config = tiny(num_class_embeds=10)
    model = UNet2DModel(**config).eval()
    inputs = make_inputs(config)
    exported = torch.export.export(model, (), kwargs=inputs | dict(return_dict=False))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(**inputs, return_dict=False)[0], model(**inputs).sample)


def test_class_labels_are_checked():
    conditional = UNet2DModel(**tiny(num_class_embeds=10))
    unconditional = UNet2DModel(**tiny())
    inputs = make_inputs(tiny())
    with pytest.raises(ValueError, match="class_labels"):
        conditional(**inputs)
    with pytest.raises(ValueError, match="class_labels"):
        unconditional(**inputs | dict(class_labels=torch.tensor([1, 2])))


def test_sample_size_not_divisible_raises(tiny_model):
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny_model(torch.randn(1, 3, 15, 16), 1)


# --- Saving and loading ---


def test_save_pretrained_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).exists()
    loaded = UNet2DModel.from_pretrained(tmp_path)
    inputs = make_inputs(tiny())
    assert constructor_config(loaded) == constructor_config(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, tiny_model(**inputs).sample, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["default", "fourier time", "class table, centered input", "non-square"])
def test_checkpoints_are_interchangeable_with_diffusers(tmp_path, name):
    config = TINY_CONFIGS[name]
    torch.manual_seed(0)
    UNet2DModel(**config).save_pretrained(tmp_path / "ours")
    diffusers.UNet2DModel(**config).save_pretrained(tmp_path / "theirs")
    inputs = make_inputs(config)

    for folder in ("ours", "theirs"):
        ours = UNet2DModel.from_pretrained(tmp_path / folder)
        theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / folder)
        assert max_abs_difference(ours, theirs, inputs) < 1e-5


def legacy_named(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as diffusers < 0.14 named it."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, tensor in state_dict.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = tensor
    return legacy


def test_convert_legacy_attention_keys():
    state_dict = {name: torch.zeros(1) for name in ("mid_block.attentions.0.query.weight", "conv_in.weight")}
    state_dict["up_blocks.1.attentions.2.proj_attn.bias"] = torch.ones(1)
    assert convert_legacy_attention_keys(state_dict) is state_dict
    assert set(state_dict) == {
        "mid_block.attentions.0.to_q.weight",
        "conv_in.weight",
        "up_blocks.1.attentions.2.to_out.0.bias",
    }
    assert state_dict["up_blocks.1.attentions.2.to_out.0.bias"].item() == 1


def test_legacy_attention_names_load(tmp_path, tiny_model):
    legacy = legacy_named(tiny_model.state_dict())
    assert "mid_block.attentions.0.proj_attn.weight" in legacy
    tiny_model.save_pretrained(tmp_path)
    save_file(legacy, tmp_path / WEIGHTS_NAME)

    loaded = UNet2DModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.state_dict(), tiny_model.state_dict(), rtol=0, atol=0)

    fresh = UNet2DModel(**tiny())
    fresh.load_state_dict(load_file(tmp_path / WEIGHTS_NAME), strict=True)
    torch.testing.assert_close(fresh.state_dict(), tiny_model.state_dict(), rtol=0, atol=0)


def test_legacy_attention_names_load_into_a_submodule(tiny_model):
    wrapper = torch.nn.ModuleDict({"unet": UNet2DModel(**tiny())})
    wrapper.load_state_dict({f"unet.{key}": t for key, t in legacy_named(tiny_model.state_dict()).items()})
    torch.testing.assert_close(wrapper["unet"].state_dict(), tiny_model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("corruption", "expected_message"),
    [
        ("drop conv_out.weight", "missing_keys: ['conv_out.weight']"),
        ("add an extra weight", "unexpected_keys: ['extra.weight']"),
        ("reshape conv_out.bias", "conv_out.bias expected shape torch.Size([3]), but got torch.Size([5])"),
    ],
)
def test_from_pretrained_refuses_mismatched_weights(tmp_path, tiny_model, corruption, expected_message):
    tiny_model.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / WEIGHTS_NAME)
    if corruption == "drop conv_out.weight":
        del state_dict["conv_out.weight"]
    elif corruption == "add an extra weight":
        state_dict["extra.weight"] = torch.zeros(2)
    else:
        state_dict["conv_out.bias"] = torch.zeros(5)
    save_file(state_dict, tmp_path / WEIGHTS_NAME)

    with pytest.raises(ValueError) as error:
        UNet2DModel.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert expected_message in str(error.value)


def test_from_pretrained_reports_mismatched_shapes_when_diffusers_would_reinitialize(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / WEIGHTS_NAME)
    state_dict["conv_out.bias"] = torch.zeros(5)
    save_file(state_dict, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"conv_out.bias has shape \(5,\) in the checkpoint but \(3,\) in the model"):
        UNet2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=False, ignore_mismatched_sizes=True)


# --- Config validation ---

SKIP_DOWN = ("SkipDownBlock2D", "AttnSkipDownBlock2D")
SKIP_UP = ("AttnSkipUpBlock2D", "SkipUpBlock2D")
NCSNPP = dict(block_out_channels=(32, 32), norm_num_groups=None, down_block_types=SKIP_DOWN, up_block_types=SKIP_UP)

# (overrides of tiny(), the message expected). diffusers fails on each of these too, when building or in forward.
INVALID_CONFIGS = [
    (
        dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")),
        "down_block_types entry='CrossAttnDownBlock2D'; supported values: 'DownBlock2D', 'AttnDownBlock2D', "
        "'ResnetDownsampleBlock2D', 'SkipDownBlock2D', 'AttnSkipDownBlock2D'",
    ),
    (
        dict(up_block_types=("UpDecoderBlock2D", "UpBlock2D")),
        "up_block_types entry='UpDecoderBlock2D'; supported values: 'UpBlock2D', 'AttnUpBlock2D', "
        "'ResnetUpsampleBlock2D', 'SkipUpBlock2D', 'AttnSkipUpBlock2D'",
    ),
    (
        dict(time_embedding_type="sinusoidal"),
        "time_embedding_type='sinusoidal'; supported values: 'positional', 'fourier', 'learned'",
    ),
    (
        dict(resnet_time_scale_shift="spatial"),
        "resnet_time_scale_shift='spatial'; supported values: 'default', 'scale_shift'",
    ),
    (
        dict(down_block_types=("AttnDownBlock2D", "DownBlock2D"), downsample_type="fir"),
        "downsample_type='fir'; supported values: 'conv', 'resnet'",
    ),
    (dict(upsample_type="fir"), "upsample_type='fir'; supported values: 'conv', 'resnet'"),
    (dict(act_fn="tanh"), "act_fn='tanh'; supported values: 'silu', 'swish', 'mish', 'gelu', 'relu'"),
    (dict(block_out_channels=(16, 32, 64)), "must have the same length"),
    (dict(norm_num_groups=12), "norm_num_groups=12 must divide the channels of every layer it normalizes, [16, 32]"),
    (dict(norm_num_groups=None), "norm_num_groups=None must divide the channels of every layer it normalizes: only"),
    (
        dict(NCSNPP, down_block_types=("SkipDownBlock2D", "DownBlock2D")),
        "norm_num_groups=None must divide the channels of every layer it normalizes",
    ),
    (dict(attn_norm_num_groups=5), "attn_norm_num_groups=5 must divide block_out_channels[-1]=32"),
    (dict(attention_head_dim=64), "attention_head_dim=64 must not exceed the channels of any level that attends, [32]"),
    (dict(time_embedding_type="learned"), "needs num_train_timesteps"),
    (dict(NCSNPP, in_channels=1), "The Skip* (NCSN++) down blocks need in_channels=3"),
    (dict(NCSNPP, out_channels=1), "The Skip* (NCSN++) up blocks need out_channels=3"),
    (
        dict(NCSNPP, block_out_channels=(32, 32, 32), down_block_types=("DownBlock2D", *SKIP_DOWN), norm_num_groups=8,
             up_block_types=("UpBlock2D", *SKIP_UP)),
        "The Skip* (NCSN++) down blocks must come first in down_block_types",
    ),
    (dict(NCSNPP, norm_num_groups=8, up_block_types=SKIP_UP[:1] + ("UpBlock2D",)), "must come last in up_block_types"),
    # NCSN++ blocks pick min(channels // 4, 32) groups, and 32 before attending: 16 channels cannot attend.
    (dict(NCSNPP, block_out_channels=(16, 16)), "Cannot build down_block_types[1]='AttnSkipDownBlock2D' with 16"),
]

# Configs diffusers builds and runs but that are nonsense; rejected here (listed in the README's "Differences from
# diffusers").
REJECTED_THOUGH_DIFFUSERS_RUNS_THEM = [
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "supported values: 'UNetMidBlock2D', None"),
    (dict(class_embed_type="projection"), "class_embed_type='projection'; supported values: None, 'timestep', "),
    (dict(layers_per_block=0, block_out_channels=(16, 16)), "layers_per_block must be at least 1"),
    (
        dict(block_out_channels=(32, 32), up_block_types=("AttnUpBlock2D", "KUpBlock2D")),
        "up_block_types entry='KUpBlock2D'; supported values",
    ),
]


def diffusers_runs(config: dict) -> bool:
    """Whether diffusers' UNet2DModel builds `config` and runs a forward pass."""
    try:
        with torch.no_grad():
            diffusers.UNet2DModel(**config)(**make_inputs(config))
    except Exception:  # noqa: BLE001 - any failure counts: a TypeError, a shape mismatch deep in torch, ...
        return False
    return True


@pytest.mark.parametrize(("overrides", "expected_message"), INVALID_CONFIGS + REJECTED_THOUGH_DIFFUSERS_RUNS_THEM)
def test_invalid_config_raises(overrides, expected_message):
    with pytest.raises(ValueError) as error:
        UNet2DModel(**tiny(**overrides))
    assert expected_message in str(error.value)


@pytest.mark.parametrize(("overrides", "rejected_by_diffusers"), [
    *[(overrides, True) for overrides, _ in INVALID_CONFIGS],
    *[(overrides, False) for overrides, _ in REJECTED_THOUGH_DIFFUSERS_RUNS_THEM],
])
def test_rejected_configs_are_those_diffusers_cannot_run(overrides, rejected_by_diffusers):
    """A config is rejected here only where diffusers fails too, or where the README says why."""
    assert diffusers_runs(tiny(**overrides)) is not rejected_by_diffusers
