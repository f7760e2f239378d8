"""The `sample`, `evaluate` and `noise` commands on a tiny pipeline saved to disk."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf import DDPMPipeline
from ddpm_hf.commands import add_evaluate_command, add_noise_command, add_sample_command

from helpers import save_grayscale_pipeline


def run(*argv: str) -> None:
    """Parse and run one command, as `ddpm-hf` does."""
    parser = argparse.ArgumentParser(prog="ddpm-hf")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in (add_sample_command, add_evaluate_command, add_noise_command):
        add_command(subparsers)
    args = parser.parse_args([str(arg) for arg in argv])
    args.run(args)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved 8 px grayscale pipeline with 100 training timesteps (untrained)."""
    path = tmp_path_factory.mktemp("model")
    save_grayscale_pipeline(path, num_train_timesteps=100)
    return path


def test_sample_writes_one_png_per_image_independent_of_batch_size(model_dir, tmp_path):
    run("sample", model_dir, "--num-images", 3, "--batch-size", 2, "--steps", 5, "--out", tmp_path / "a")
    run("sample", model_dir, "--num-images", 3, "--batch-size", 3, "--steps", 5, "--out", tmp_path / "b")
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    for name in names:
        first, second = Image.open(tmp_path / "a" / name), Image.open(tmp_path / "b" / name)
        assert (first.mode, first.size) == ("L", (8, 8))
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_sample_with_ddim_writes_a_grid_gif_and_strip(model_dir, tmp_path, capsys):
    run("sample", model_dir, "--num-images", 5, "--scheduler", "ddim", "--steps", 6, "--out", tmp_path / "grid.png",
        "--gif", tmp_path / "denoising.gif", "--strip", tmp_path / "strip.png", "--strip-timesteps", "99,50,0")
    assert Image.open(tmp_path / "grid.png").size == (3 * 64, 2 * 64)  # 5 images in 3 x 2, 8 px cells shown at 64
    with Image.open(tmp_path / "denoising.gif") as gif:
        assert gif.n_frames == 6  # one per DDIM step (fewer than the 40-frame default)
    assert Image.open(tmp_path / "strip.png").size == (3 * 64, 5 * 64 + 14)  # 3 timesteps x 5 images + labels
    assert "Wrote the denoising animation (6 frames)" in capsys.readouterr().out


def test_sample_from_a_folder_that_is_not_a_pipeline_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a saved DDPM pipeline"):
        run("sample", tmp_path, "--steps", 1)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        run("sample", tmp_path / "model.safetensors", "--steps", 1)
    with pytest.raises(ValueError, match="neither a local folder nor a loadable Hub repo"):
        run("sample", "no-such-user/no-such-model", "--steps", 1)  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ValueError, match="--num-images must be a positive integer"):
        run("sample", tmp_path, "--num-images", 0)


def test_evaluate_prints_and_writes_metrics(model_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    run("evaluate", model_dir, "--num-samples", 12, "--scheduler", "ddim", "--steps", 3, "--output", out,
        "--cache-dir", tmp_path / "cache")
    captured = capsys.readouterr()
    assert "warning: Only 12 generated images" in captured.err
    assert "12 samples (ddim, 3 steps, seed 0) vs digits, split train, 8 px (1437 images)" in captured.out
    record = json.loads(out.read_text())
    assert record["num_samples"] == 12 and record["scheduler"] == "ddim"
    for name in ("frechet_distance", "kid", "precision", "recall", "confidence", "class_coverage"):
        assert f"{name} " in captured.out
        assert isinstance(record[name], float)
    assert record["frechet_distance"] > 50  # an untrained model draws noise, far from the digits


def test_noise_writes_the_forward_process_strip(model_dir, tmp_path):
    Image.new("L", (8, 8), 255).save(tmp_path / "white.png")
    run("noise", model_dir, tmp_path / "white.png", "--timesteps", "0,50,99", "--out", tmp_path / "noising.png")
    strip = np.asarray(Image.open(tmp_path / "noising.png"))
    assert strip.shape == (64 + 14, 3 * 64, 3)
    assert strip[14:, :64].mean() > 240 and strip[14:, 128:].mean() < 200  # t = 0 still white, t = 99 noise
    with pytest.raises(ValueError, match="Cannot read the image"):
        run("noise", model_dir, tmp_path / "missing.png")


def test_the_sampling_example_writes_the_pipelines_images_as_a_grid(model_dir, tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "sample.py"
    out = tmp_path / "grid.png"
    subprocess.run([sys.executable, str(example), str(model_dir), "--num_images", "4", "--steps", "3", "--seed", "1",
                    "--out", str(out)], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    pipe = DDPMPipeline.from_pretrained(model_dir)
    expected = pipe(batch_size=4, num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images
    grid = np.asarray(Image.open(out).convert("L"))  # diffusers' make_image_grid pastes into an RGB canvas
    assert grid.shape == (128, 128)  # 2x2 images of 8 px, each enlarged to 64 px
    np.testing.assert_array_equal(grid[::8, ::8][:8, :8], np.asarray(expected[0]))
