"""Checkpoint interchange with diffusers, both ways and in both layouts, and clear load errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import diffusers
from safetensors.torch import load_file, save_file

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel

from helpers import CIFAR10_CONFIG, as_diffusers, make_pipeline, sample

# Plain diffusers in a process that never imports ddpm_hf: proof that saved pipelines need nothing of ours.
DIFFUSERS_ONLY_SCRIPT = """
import sys, numpy as np, torch, diffusers
pipe = diffusers.DDPMPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
assert type(pipe.unet) is diffusers.UNet2DModel and type(pipe.scheduler) is diffusers.DDPMScheduler
images = pipe(batch_size=2, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np").images
assert not any(name.startswith("ddpm_hf") for name in sys.modules), "ddpm_hf was imported"
np.save(sys.argv[2], images)
"""


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_saved_pipeline_is_safetensors_in_diffusers_layout(tiny_unet_config, tmp_path):
    make_pipeline(tiny_unet_config).save_pretrained(tmp_path)
    assert files_in(tmp_path) == {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    }
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert json.loads((tmp_path / "unet/config.json").read_text())["_class_name"] == "UNet2DModel"


def test_round_trip_loads_our_classes_and_same_images(tiny_unet_config, tmp_path):
    pipe = make_pipeline(tiny_unet_config)
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is UNet2DModel and type(loaded.scheduler) is DDPMScheduler
    assert loaded.name_or_path == str(tmp_path)
    np.testing.assert_allclose(sample(loaded), sample(pipe), atol=1e-6, rtol=0)


def test_ours_loads_in_plain_diffusers_with_same_images(tiny_unet_config, tmp_path):
    pipe = make_pipeline(tiny_unet_config)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "images.npy"
    subprocess.run([sys.executable, "-c", DIFFUSERS_ONLY_SCRIPT, str(tmp_path / "pipe"), str(out)], check=True)
    np.testing.assert_allclose(np.load(out), sample(pipe, batch_size=2), atol=1e-5, rtol=0)


def test_diffusers_nested_layout_loads_into_our_classes(tiny_unet_config, tmp_path):
    reference = as_diffusers(make_pipeline(tiny_unet_config, seed=3))
    reference.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is UNet2DModel and type(loaded.scheduler) is DDPMScheduler
    np.testing.assert_allclose(sample(loaded), sample(reference), atol=1e-5, rtol=0)


def test_other_scheduler_classes_stay_diffusers_classes(tiny_unet_config, tmp_path):
    pipe = make_pipeline(tiny_unet_config)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is UNet2DModel and type(loaded.scheduler) is diffusers.DDIMScheduler


@pytest.fixture(scope="module")
def cifar10_flat_folder(tmp_path_factory) -> tuple[Path, diffusers.UNet2DModel]:
    """A folder laid out like google/ddpm-cifar10-32, with the legacy attention key names of its weights."""
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**CIFAR10_CONFIG).eval()
    reference.save_config(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_config(folder)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for key, value in reference.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        state_dict[key] = value.contiguous()
    assert any(".query." in key for key in state_dict)
    save_file(state_dict, folder / "diffusion_pytorch_model.safetensors")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1",
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, reference


@pytest.mark.parametrize("with_model_index", [True, False])
def test_flat_google_layout_loads_into_our_classes(cifar10_flat_folder, with_model_index, tmp_path):
    folder, reference = cifar10_flat_folder
    if not with_model_index:
        for name in ("config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"):
            (tmp_path / name).symlink_to(folder / name)
        folder = tmp_path
    pipe = DDPMPipeline.from_pretrained(folder)
    assert type(pipe.unet) is UNet2DModel and type(pipe.scheduler) is DDPMScheduler
    assert sum(p.numel() for p in pipe.unet.parameters()) == 35_746_307
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10).sample, reference(x, 10).sample, atol=1e-5, rtol=0)


def test_torch_dtype_on_load(tiny_unet_config, tmp_path):
    make_pipeline(tiny_unet_config).save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    assert np.isfinite(sample(pipe, num_inference_steps=3)).all()


@pytest.mark.parametrize("kwargs", [
    dict(torch_dtype=torch.float16),
    dict(torch_dtype={"unet": torch.bfloat16, "default": torch.float16}),
    dict(variant="fp16"),
    dict(low_cpu_mem_usage=False),
    dict(low_cpu_mem_usage=True, use_safetensors=True),
    dict(device_map="cpu"),
    dict(device_map="balanced"),
], ids=str)
def test_loading_options_do_what_they_do_in_diffusers(tiny_unet_config, tmp_path, kwargs):
    pipe = make_pipeline(tiny_unet_config)
    pipe.save_pretrained(tmp_path, variant=kwargs.get("variant"))
    ours, theirs = (cls.from_pretrained(tmp_path, **kwargs) for cls in (DDPMPipeline, diffusers.DDPMPipeline))
    assert type(ours.unet) is UNet2DModel
    assert (ours.unet.dtype, ours.unet.device) == (theirs.unet.dtype, theirs.unet.device)
    assert getattr(ours, "hf_device_map", None) == getattr(theirs, "hf_device_map", None)
    torch.testing.assert_close(ours.unet.state_dict(), theirs.unet.state_dict(), rtol=0, atol=0)
    if isinstance(kwargs.get("torch_dtype"), dict):  # a dict is for pipelines only, in diffusers too
        return
    if kwargs.get("device_map") == "balanced":  # a pipeline strategy; diffusers' UNet2DModel refuses it too
        for unet_class in (UNet2DModel, diffusers.UNet2DModel):
            with pytest.raises(ValueError, match="does not support `device_map='balanced'`"):
                unet_class.from_pretrained(tmp_path / "unet", **kwargs)
        return
    unet, their_unet = (cls.from_pretrained(tmp_path / "unet", **kwargs)
                        for cls in (UNet2DModel, diffusers.UNet2DModel))
    assert (unet.dtype, unet.device) == (their_unet.dtype, their_unet.device)
    torch.testing.assert_close(unet.state_dict(), their_unet.state_dict(), rtol=0, atol=0)


def test_quantization_config_is_refused(saved):
    with pytest.raises(ValueError, match="quantization_config is not supported"):
        DDPMPipeline.from_pretrained(saved, quantization_config=object())


# --- loading broken folders -----------------------------------------------------------------------


@pytest.fixture
def saved(tiny_unet_config, tmp_path) -> Path:
    make_pipeline(tiny_unet_config).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OSError, match="is not a saved DDPM pipeline"):
        DDPMPipeline.from_pretrained(tmp_path)


def test_missing_weights_names_the_file(saved):
    (saved / "unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        DDPMPipeline.from_pretrained(saved)


def test_corrupted_weights_name_the_file(saved):
    weights = saved / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        DDPMPipeline.from_pretrained(saved)


def test_corrupted_configs_name_the_file(saved):
    (saved / "scheduler/scheduler_config.json").write_text("{not json")
    with pytest.raises(OSError, match="scheduler_config.json"):
        DDPMPipeline.from_pretrained(saved)
    (saved / "model_index.json").write_text("{not json")
    with pytest.raises(OSError, match="model_index.json"):
        DDPMPipeline.from_pretrained(saved)


def test_weights_missing_keys_are_an_error_not_a_silent_half_load(saved):
    weights = saved / "unet/diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    del state_dict["conv_out.weight"]
    save_file(state_dict, weights)
    with pytest.raises(ValueError, match="conv_out.weight"):
        DDPMPipeline.from_pretrained(saved)


def test_weights_of_another_shape_are_an_error(saved, tiny_unet_config, tmp_path):
    other = UNet2DModel(**{**tiny_unet_config, "block_out_channels": (8, 16)})
    save_file(other.state_dict(), saved / "unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError):
        DDPMPipeline.from_pretrained(saved)
