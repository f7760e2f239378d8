"""The samplers, the real-data floor, `ddpm-hf sweep` and the fast sampler it saves, on a tiny pipeline on disk."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel
from ddpm_hf.cli import main as cli_main
from ddpm_hf.evaluation import (
    EvaluationResult,
    SamplerSweep,
    SweepPoint,
    evaluate_pipeline,
    prepare_floor,
    prepare_reference,
    sweep_samplers,
)
from ddpm_hf.evaluation import sweep as sweep_module
from ddpm_hf.pipelines.fast_sampler import FAST_SCHEDULER_CONFIG, FastSampler
from ddpm_hf.schedulers.samplers import SAMPLERS

from helpers import save_grayscale_pipeline

NUM_TRAIN_TIMESTEPS = 50


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference_stats")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A saved 8 px grayscale pipeline with 50 training timesteps (untrained)."""
    path = tmp_path_factory.mktemp("model") / "ddpm-tiny"
    save_grayscale_pipeline(path, NUM_TRAIN_TIMESTEPS)
    return path


@pytest.fixture
def model_copy(saved_model, tmp_path):
    return Path(shutil.copytree(saved_model, tmp_path / "ddpm-tiny"))


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_sampling(*args, **kwargs):
    raise AssertionError("bad input must fail before any image is generated")


# --- Samplers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_starts_from_pure_noise_at_the_last_training_timestep(name):
    scheduler = SAMPLERS[name].make_scheduler(DDPMScheduler(num_train_timesteps=1000).config)
    for steps in (5, 10):
        scheduler.set_timesteps(steps)
        assert int(scheduler.timesteps[0]) == 999  # "trailing": not 800, where "leading" starts with 5 steps


@pytest.mark.parametrize("name", ["dpm-solver", "unipc"])
def test_the_ode_solvers_clip_x0_to_the_data_range_as_ddpm_does(name):
    scheduler = SAMPLERS[name].make_scheduler(DDPMScheduler().config)
    x0 = torch.linspace(-3, 3, 2 * 4 * 4).reshape(2, 1, 4, 4)
    torch.testing.assert_close(scheduler._threshold_sample(x0), x0.clamp(-1, 1))


# --- The real-data floor -----------------------------------------------------------------------------------------


def test_floor_of_the_held_out_digits_and_its_spread_over_partitions(cache_dir):
    extractor, reference = prepare_reference(1, 16, cache_dir=cache_dir)
    floor = prepare_floor(extractor, reference, "test", 360, cache_dir=cache_dir)
    assert floor.frechet_distance == pytest.approx(4.45, abs=0.05)  # the README's floor row
    assert (floor.num_images, floor.num_partitions, floor.description) == (360, 100, "digits, split test, 16 px")
    assert 1 < floor.std < 4  # 2.2: FD at N = 360 varies by chance far more than its digits suggest
    assert prepare_floor(extractor, reference, "test", 360, cache_dir=cache_dir) == floor  # seeded
    with pytest.raises(ValueError, match="overlaps the reference's split 'train'"):
        prepare_floor(extractor, reference, "train", 360, cache_dir=cache_dir)


# --- The recommendation ------------------------------------------------------------------------------------------


def point(sampler, steps, distance):
    result = EvaluationResult(distance, 0.0, 0.0, 0.5, 0.5, 8, 8, "digits-x", "digits")
    return SweepPoint(sampler, steps, steps, 1.0, 8.0, result)


def test_recommendation_is_the_cheapest_pair_within_the_tolerance_of_the_best():
    points = [point("ddpm", 1000, 5.0), point("ddpm", 20, 40.0), point("ddim", 20, 6.0), point("unipc", 10, 5.4),
              point("dpm-solver", 10, 5.3), point("dpm-solver", 5, 9.0)]
    sweep = SamplerSweep(points, 0.5, "given", None, 8, 0, 8, 1000, "digits", "digits-x")
    assert (sweep.best.sampler, sweep.best.steps) == ("ddpm", 1000)
    assert (sweep.recommendation.sampler, sweep.recommendation.steps) == ("dpm-solver", 10)  # ties: the closer
    assert sweep.speedup == 100
    sweep.tolerance = 0.1
    assert (sweep.recommendation.sampler, sweep.recommendation.steps) == ("ddpm", 1000)


# --- The sweep ---------------------------------------------------------------------------------------------------


def test_sweep_scores_every_pair_from_the_same_seeds(saved_model, cache_dir):
    pipe = DDPMPipeline.from_pretrained(saved_model)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    with pytest.warns(UserWarning, match="Only 6 generated images"):
        sweep = sweep_samplers(pipe, ["ddpm", "dpm-solver", "pndm"], [2, 4], num_samples=6, batch_size=4,
                               cache_dir=cache_dir)

    assert [(p.sampler, p.steps) for p in sweep.points] == [
        ("ddpm", 2), ("ddpm", 4), ("dpm-solver", 2), ("dpm-solver", 4), ("pndm", 2), ("pndm", 4)]
    # The UNet ran model_calls times per batch of each pair (2 batches: 4 + 2 images); PNDM's schedule is longer.
    assert len(calls) == sum(2 * p.model_calls for p in sweep.points)
    assert [p.model_calls for p in sweep.points][:4] == [2, 4, 2, 4]
    assert type(pipe.scheduler) is DDPMScheduler  # put back
    assert sweep.floor.num_images == 6 and sweep.tolerance == sweep.floor.std > 0
    assert all(p.frechet_distance > 0 and p.images_per_second > 0 for p in sweep.points)

    pipe.scheduler = SAMPLERS["dpm-solver"].make_scheduler(pipe.scheduler.config)
    with pytest.warns(UserWarning):
        alone = evaluate_pipeline(pipe, 6, num_inference_steps=4, sample_batch_size=6, cache_dir=cache_dir)
    assert sweep.point("dpm-solver", 4).frechet_distance == pytest.approx(alone.frechet_distance, rel=1e-6)


def test_sweep_command_writes_the_curve_and_saves_the_fast_sampler_without_touching_the_weights(
        model_copy, cache_dir, tmp_path, capsys):
    before = fingerprint(model_copy)
    reference = diffusers.DDPMPipeline.from_pretrained(model_copy)
    out = tmp_path / "sweep"
    status = cli_main(["sweep", str(model_copy), "--samplers", "ddpm,unipc", "--steps", "3,50", "--num-samples", "6",
                       "--cache-dir", str(cache_dir), "--out", str(out), "--tolerance", "1e9", "--save"])
    assert status == 0, capsys.readouterr().err

    record = json.loads((out / "sampler_sweep.json").read_text())
    assert [(p["sampler"], p["steps"], p["model_calls"]) for p in record["points"]] == [
        ("ddpm", 3, 3), ("ddpm", 50, 50), ("unipc", 3, 3), ("unipc", 50, 50)]
    for key in ("frechet_distance", "kid", "precision", "recall", "seconds", "images_per_second"):
        assert isinstance(record["points"][0][key], float)
    assert record["samplers"]["unipc"]["settings"]["timestep_spacing"] == "trailing"
    assert record["recommendation"]["steps"] == 3 and record["tolerance_source"] == "given"
    assert (out / "sampler_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Real-data floor: " in printed and "Recommended: " in printed and "fewer model calls" in printed

    # Saved: the fast config, the curve and the card; untouched: model_index.json, the weights, diffusers' configs.
    after = fingerprint(model_copy)
    assert {name: digest for name, digest in after.items() if name in before} == before
    assert set(after) - set(before) == {f"scheduler/{FAST_SCHEDULER_CONFIG}", "sampler_sweep.json",
                                        "sampler_sweep.png", "README.md"}
    plain = diffusers.DDPMPipeline.from_pretrained(model_copy)
    assert type(plain.scheduler) is diffusers.DDPMScheduler

    def images(pipe):
        return pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    np.testing.assert_array_equal(images(plain), images(reference))  # the same pipeline as before the save

    fast = DDPMPipeline.from_pretrained(model_copy).use_fast_sampler()
    recommended = record["recommendation"]["sampler"]
    assert (fast.fast_sampler.sampler, fast.fast_sampler.num_inference_steps) == (recommended, 3)
    calls = []
    fast.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    fast(batch_size=1)
    assert len(calls) == 3  # the measured steps by default
    card = (model_copy / "README.md").read_text()
    assert "![Fréchet distance against model calls, for each sampler](sampler_sweep.png)" in card
    assert ".use_fast_sampler()" in card and "fewer model calls" in card
    assert "(sampler_sweep.png)](sampler_sweep.png)" not in card  # the curve is not shown as a sample image


def test_fast_sampler_config_is_a_plain_diffusers_scheduler_config(model_copy):
    pipe = DDPMPipeline.from_pretrained(model_copy)
    scheduler = SAMPLERS["dpm-solver"].make_scheduler(pipe.scheduler.config)
    path = FastSampler.from_scheduler("dpm-solver", scheduler, 7, {"speedup": 7.1}).save(model_copy)

    plain = diffusers.DPMSolverMultistepScheduler.from_config(json.loads(path.read_text()))
    settings = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    assert {key: value for key, value in plain.config.items() if not key.startswith("_")} == settings
    loaded = DDPMPipeline.from_pretrained(model_copy)
    assert loaded.fast_sampler.measurement == {"speedup": 7.1}
    loaded.save_pretrained(model_copy.parent / "copy")  # the measurement travels with an unchanged copy
    assert FastSampler.load(model_copy.parent / "copy") == loaded.fast_sampler

    path.write_text(json.dumps({"_class_name": "DDIMScheduler", "_ddpm_hf_sampler": "dpm-solver",
                                "_ddpm_hf_num_inference_steps": 7}))
    with pytest.warns(UserWarning, match="names the sampler 'dpm-solver', whose class is DPMSolverMultistepScheduler"):
        damaged = DDPMPipeline.from_pretrained(model_copy)  # the pipeline loads; its fast sampler does not
    with pytest.raises(ValueError, match="has no measured fast sampler"):
        damaged.use_fast_sampler()


def test_sample_and_evaluate_fast_use_the_saved_sampler(model_copy, cache_dir, tmp_path, capsys):
    assert cli_main(["sample", str(model_copy), "--fast", "--num-images", "2"]) == 1
    error = capsys.readouterr().err
    assert "has no measured fast sampler" in error and f"ddpm-hf sweep {model_copy} --save" in error
    pipe = DDPMPipeline.from_pretrained(model_copy)
    FastSampler.from_scheduler("unipc", SAMPLERS["unipc"].make_scheduler(pipe.scheduler.config), 4).save(model_copy)

    assert cli_main(["sample", str(model_copy), "--fast", "--num-images", "2", "--out", str(tmp_path / "g.png")]) == 0
    output = tmp_path / "metrics.json"
    assert cli_main(["evaluate", str(model_copy), "--fast", "--num-samples", "4", "--cache-dir", str(cache_dir),
                     "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    assert (record["scheduler"], record["steps"]) == ("unipc", 4)
    assert record["floor"]["num_images"] == 4 and "real digits: " in capsys.readouterr().out
    assert cli_main(["sample", str(model_copy), "--fast", "--steps", "9"]) == 1
    assert "leave out --scheduler and --steps" in capsys.readouterr().err


def test_evaluate_defaults_to_the_fast_sampler(saved_model, cache_dir, tmp_path, capsys):
    output = tmp_path / "metrics.json"
    assert cli_main(["evaluate", str(saved_model), "--num-samples", "4", "--cache-dir", str(cache_dir),
                     "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    assert (record["scheduler"], record["steps"]) == ("dpm-solver-sde", 20)


# --- Bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (["--samplers", "ddpm,plms"], "Unknown sampler 'plms': choose from ddpm, ddim, dpm-solver, dpm-solver-sde, unipc"),
    (["--steps", "0,10"], r"between 1 and the model's num_train_timesteps \(50\)"),
    (["--steps", "10,51"], r"51 steps: .* between 1 and the model's num_train_timesteps \(50\)"),
    (["--reference", "SMALL_IMAGES", "--features", "digits", "--split", "train", "--floor-split", "none",
      "--tolerance", "1"], r"3 of 3 images in the reference .* smaller than the samples' 8 px \(e.g. 4x4\)"),
    (["--floor-split", "none"], "give a tolerance"),
    (["--split", "test"], "overlaps the reference's split 'test'"),
])
def test_bad_sweep_input_is_a_one_line_error_before_any_sampling(saved_model, cache_dir, tmp_path, monkeypatch,
                                                                 capsys, arguments, message):
    monkeypatch.setattr(sweep_module, "generate_images", no_sampling)
    (tmp_path / "small").mkdir()
    for index in range(3):
        Image.new("L", (4, 4), color=80 * index).save(tmp_path / "small" / f"{index}.png")
    arguments = [str(tmp_path / "small") if argument == "SMALL_IMAGES" else argument for argument in arguments]
    assert cli_main(["sweep", str(saved_model), "--cache-dir", str(cache_dir), *arguments]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after diffusers' "Loading pipeline components" bar
    assert error.startswith("ddpm-hf sweep: error: ") and re.search(message, error)


def test_sweep_refuses_an_rgb_model_against_the_digits_and_save_into_a_hub_id(tmp_path, cache_dir, monkeypatch,
                                                                               capsys, tiny_unet_config):
    monkeypatch.setattr(sweep_module, "generate_images", no_sampling)
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**tiny_unet_config), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "rgb")
    assert cli_main(["sweep", str(tmp_path / "rgb"), "--cache-dir", str(cache_dir)]) == 1
    assert r"3 channel(s) (RGB)" in capsys.readouterr().err
    assert cli_main(["sweep", "alice/ddpm-digits", "--save"]) == 1
    error = capsys.readouterr().err
    assert "--save writes the recommendation into the pipeline folder, but alice/ddpm-digits is not a local" in error
