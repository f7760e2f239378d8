"""Pictures: sample grids, the denoising recorder (GIF and strip), the forward-process strip."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf import DDPMScheduler
from ddpm_hf.visualization import DenoisingRecorder, forward_process_strip, make_grid

from helpers import make_pipeline

LABELS = 14  # the height of the timestep labels above a strip


@pytest.fixture
def pipe(tiny_unet_config):
    return make_pipeline(tiny_unet_config)  # 8 px RGB


def test_make_grid_pads_the_last_row_and_enlarges_small_images():
    images = torch.linspace(0.2, 1, 5)[:, None, None, None].expand(5, 1, 8, 8)  # five flat grays
    grid = np.asarray(make_grid(images))
    assert grid.shape == (2 * 64, 3 * 64, 3)  # 3 columns, 2 rows, 8 px cells enlarged 8x
    assert grid[0, 0, 0] == 51 and grid[64, 64, 0] == 255  # image 0; image 4, second row
    assert grid[64:, 128:].max() == 0  # the padding cell is black
    assert make_grid(images, cols=5, min_cell=8).size == (40, 8)


def test_recorder_snapshots_at_the_nearest_timesteps(pipe):
    recorder = DenoisingRecorder(timesteps=[999, 500, 0])
    pipe(batch_size=2, num_inference_steps=10, callback_on_step_end=recorder)
    assert list(pipe.scheduler.timesteps[:2]) == [900, 800]  # 10 steps of T = 1000
    assert [s.timestep for s in recorder.snapshots] == [900, 500, 0]
    assert all(s.images.shape == (2, 3, 8, 8) and s.images.dtype == torch.uint8 for s in recorder.snapshots)


def test_recorder_keeps_x0_predictions_on_request(pipe):
    samples, predictions = DenoisingRecorder(num_frames=2), DenoisingRecorder(num_frames=2, key="pred_original_sample")
    for recorder in (samples, predictions):
        pipe(batch_size=1, num_inference_steps=4, generator=torch.manual_seed(0), callback_on_step_end=recorder)
    assert not torch.equal(samples.snapshots[0].images, predictions.snapshots[0].images)
    torch.testing.assert_close(samples.snapshots[-1].images, predictions.snapshots[-1].images, atol=1, rtol=0)


def test_denoising_gif_has_one_frame_per_snapshot(pipe, tmp_path):
    recorder = DenoisingRecorder(num_frames=5)
    pipe(batch_size=4, num_inference_steps=10, callback_on_step_end=recorder)
    assert [s.timestep for s in recorder.snapshots] == [900, 700, 500, 200, 0]  # steps 0, 2, 4, 7, 9 of 10
    recorder.save_gif(tmp_path / "denoising.gif", frame_ms=50, final_ms=1000)
    with Image.open(tmp_path / "denoising.gif") as gif:
        assert gif.n_frames == 5
        assert gif.size == (2 * 64, 2 * 64)  # a 2 x 2 grid of the batch
        durations = []
        for frame in range(gif.n_frames):
            gif.seek(frame)
            durations.append(gif.info["duration"])
    assert durations == [50, 50, 50, 50, 1000]


def test_denoising_strip_is_a_row_per_image_and_a_column_per_snapshot(pipe):
    recorder = DenoisingRecorder(timesteps=[999, 500, 0])
    pipe(batch_size=3, num_inference_steps=10, callback_on_step_end=recorder)
    assert recorder.strip().size == (3 * 64, 3 * 64 + LABELS)
    assert recorder.strip(max_images=2).size == (3 * 64, 2 * 64 + LABELS)


def test_recorder_without_a_run_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="Nothing recorded"):
        DenoisingRecorder().save_gif(tmp_path / "x.gif")


def test_forward_strip_shows_q_xt_given_x0():
    image = Image.fromarray(np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1)))  # a horizontal ramp
    scheduler = DDPMScheduler()
    strip = np.asarray(forward_process_strip(image, scheduler, timesteps=[0, 500, 999], seed=3)).astype(np.float64)
    assert strip.shape == (64 + LABELS, 3 * 64, 3)
    # Each column is x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with the same eps (Ho et al., eq. 4).
    x0 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    eps = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(3))[0, 0]
    for column, t in enumerate([0, 500, 999]):
        alpha_bar = scheduler.alphas_cumprod[t]
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
        expected = ((x_t + 1) / 2).clamp(0, 1) * 255
        cell = strip[LABELS::4, column * 64 : (column + 1) * 64 : 4, 0]  # undo the 4x enlargement
        np.testing.assert_allclose(cell, expected.numpy(), atol=1)
    assert np.abs(strip[LABELS::4, :64:4, 0] - np.asarray(image)).mean() < 3  # t = 0: the image itself


def test_forward_strip_defaults_scale_with_T_and_reject_out_of_range():
    image = Image.new("RGB", (8, 8), "white")
    strip = forward_process_strip(image, DDPMScheduler(num_train_timesteps=100))
    assert strip.size == (8 * 64, 64 + LABELS)  # 8 columns: 0, 5, 10, 20, 30, 50, 69, 99
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        forward_process_strip(image, DDPMScheduler(num_train_timesteps=100), timesteps=[0, 100])
