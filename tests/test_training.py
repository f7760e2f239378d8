"""The training loop, run for real in-process: tiny image folders, the `micro` UNet at 8 px, a few steps."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel
from ddpm_hf.training import (
    UNET_PRESETS,
    DataConfig,
    LaunchError,
    NonFiniteLossError,
    TrainData,
    TrainingConfig,
    load_unet_config,
    parse_args,
    train,
)
from ddpm_hf.training.checkpointing import find_checkpoint, list_checkpoints
from ddpm_hf.training.checks import count_train_steps
from ddpm_hf.training.losses import min_snr_weights, training_target

from hub_server import LocalHub, use_local_hub

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: an 8 px UNet gains nothing from more, and on a busy machine they wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """64 of scikit-learn's 8x8 handwritten digits as grayscale PNG files: real, structured, tiny."""
    folder = tmp_path_factory.mktemp("digits") / "images"
    folder.mkdir()
    for index, image in enumerate(load_digits().images[:64]):
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{index:02d}.png")
    return folder


def make_config(output_dir: Path, folder: Path | None = None, data: dict | None = None, **overrides) -> TrainingConfig:
    """A few steps of the `micro` UNet at 8 px, with nothing slow: sampling 5 steps of 4 images, no tracker, no
    quality measurement at the end."""
    data = DataConfig(**{"resolution": 8, "train_data_dir": str(folder) if folder else None,
                         "cache_dir": str(output_dir.parent / "hf_cache"), **(data or {})})
    settings = dict(model_config="micro", train_batch_size=8, max_train_steps=6, learning_rate=2e-3,
                    lr_warmup_steps=2, checkpointing_steps=3, logging_steps=3, save_images_steps=1000,
                    eval_batch_size=4, ddpm_num_inference_steps=5, logger="none", output_dir=str(output_dir),
                    eval_at_end=False)
    return TrainingConfig(data=data, **{**settings, **overrides})


def saved_weights(output_dir: Path, component: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(output_dir / component / WEIGHTS)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max():.3g}"


# --- presets, flags, loss ----------------------------------------------------------------------------


def test_presets_build_the_published_architectures():
    cifar = UNet2DModel(**load_unet_config("ddpm-cifar10"), in_channels=3, out_channels=3, sample_size=32)
    assert sum(p.numel() for p in cifar.parameters()) == 35_746_307  # google/ddpm-cifar10-32
    assert cifar.config.dropout == 0.1 and cifar.config.freq_shift == 1 and not cifar.config.flip_sin_to_cos
    tiny = UNet2DModel(**load_unet_config("tiny"), in_channels=1, out_channels=1, sample_size=16)
    assert 1.0e6 < sum(p.numel() for p in tiny.parameters()) < 1.2e6
    assert UNET_PRESETS["diffusers-example"]["block_out_channels"] == (128, 128, 256, 256, 512, 512)


def test_a_config_json_is_read_like_a_preset(tmp_path):
    UNet2DModel(**load_unet_config("micro"), in_channels=3, out_channels=3, sample_size=8).save_pretrained(tmp_path)
    config = load_unet_config(str(tmp_path / "config.json"))
    assert config["block_out_channels"] == [8, 16] and config["in_channels"] == 3
    assert not any(key.startswith("_") for key in config)


def test_cli_flags_are_the_config_fields(capsys):
    assert parse_args([]) == TrainingConfig()  # the dataclass is the one source of defaults
    config = parse_args(["--resolution", "32", "--random_flip", "--no-use_ema", "--snr_gamma", "3", "--prediction_type",
                         "v_prediction", "--dataset_name", "ylecun/mnist", "--max_train_steps", "9"])
    assert (config.data.resolution, config.data.random_flip, config.data.dataset_name) == (32, True, "ylecun/mnist")
    assert (config.use_ema, config.snr_gamma, config.prediction_type) == (False, 3.0, "v_prediction")
    # min-SNR-5 is the default (the ablation harness's evidence, README); `none` turns it off, like any optional number.
    assert (TrainingConfig().snr_gamma, parse_args(["--snr_gamma", "none"]).snr_gamma) == (5.0, None)
    assert parse_args(["--snr_gamma", "None"]).snr_gamma is None
    assert config.max_train_steps == 9

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--lr_scheduler", "sawtooth"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sawtooth'" in capsys.readouterr().err


def test_num_epochs_counts_optimizer_steps_over_all_processes():
    # 100 images on 2 processes: 50 each, 6 batches of 8, 3 optimizer steps of 2 micro-batches an epoch.
    config = TrainingConfig(num_epochs=3, train_batch_size=8, gradient_accumulation_steps=2)
    data = TrainData(dataset=None, num_channels=1, num_examples=100, name="a folder")
    assert count_train_steps(config, data, num_processes=2) == 9
    assert count_train_steps(TrainingConfig(max_train_steps=7, train_batch_size=8), data, num_processes=2) == 7


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_equal_min_snr_gamma_over_snr_in_the_x0_error(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    timesteps = torch.tensor([0, 100, 500, 999])
    snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
    # Hang et al. 2023: every target's squared error is a multiple of the x_0 error: 1, SNR or SNR + 1.
    x0_error_scale = {"sample": 1, "epsilon": snr, "v_prediction": snr + 1}[prediction_type]
    expected = torch.minimum(snr, torch.tensor(5.0)) / x0_error_scale
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0), expected.float())

    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    target = training_target(scheduler, x0, noise, timesteps)
    expected_target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, timesteps)}
    torch.testing.assert_close(target, expected_target[prediction_type])


# --- real runs -------------------------------------------------------------------------------------


def test_short_run_on_an_image_folder_lowers_the_loss_and_saves_the_pipeline(tmp_path, digit_folder):
    output_dir = tmp_path / "run"
    config = make_config(output_dir, digit_folder, max_train_steps=40, logging_steps=10, save_images_steps=20,
                         learning_rate=3e-3, lr_warmup_steps=5, logger="tensorboard", save_denoising_gif=True)
    pipeline = train(config)

    events = EventAccumulator(str(output_dir / "logs" / "ddpm_hf"))
    events.Reload()
    losses = [event.value for event in events.Scalars("loss")]
    assert [event.step for event in events.Scalars("loss")] == [10, 20, 30, 40]
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"lr", "grad_norm", "images_per_s", "ema_decay"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Images("samples")] == [20, 40]

    # The pipeline, safetensors only, with the EMA weights; the raw weights beside it; grids and the GIF.
    assert sorted(p.name for p in (output_dir / "unet").iterdir()) == ["config.json", WEIGHTS]
    assert all("checkpoints" in path.parts for path in output_dir.rglob("*.bin"))  # optimizer states only
    ema, raw = saved_weights(output_dir), saved_weights(output_dir, "unet_raw")
    assert not all(torch.equal(ema[name], raw[name]) for name in ema)
    assert_same_weights(ema, {name: p.cpu() for name, p in pipeline.unet.state_dict().items()})
    assert Image.open(output_dir / "samples.png").size == (128, 128)  # 2x2 images of 8 px, enlarged to 64
    assert (output_dir / "samples" / "step_000020.png").is_file()
    gif = Image.open(output_dir / "denoising.gif")
    assert gif.is_animated and gif.n_frames > 3

    reloaded = DDPMPipeline.from_pretrained(output_dir)
    assert reloaded.unet.config.in_channels == 1 and reloaded.unet.config.sample_size == 8
    assert reloaded(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 1)


def test_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(tmp_path, digit_folder):
    # Gradient accumulation, EMA warmup, random flips and dropout (micro has 0.1) all depend on the step;
    # 64 images in batches of 8 make 8 micro-batches an epoch, so the resumed half crosses an epoch boundary.
    settings = dict(gradient_accumulation_steps=2, max_train_steps=6, checkpointing_steps=2,
                    checkpoints_total_limit=2, data={"random_flip": True})
    uninterrupted = tmp_path / "uninterrupted"
    train(make_config(uninterrupted, digit_folder, **settings))
    assert [path.name for path in list_checkpoints(uninterrupted)] == ["checkpoint-4", "checkpoint-6"]

    resumed = tmp_path / "resumed"
    train(make_config(resumed, digit_folder, resume_from_checkpoint=str(uninterrupted / "checkpoints/checkpoint-4"),
                      **settings))
    assert_same_weights(saved_weights(resumed), saved_weights(uninterrupted))
    assert_same_weights(saved_weights(resumed, "unet_raw"), saved_weights(uninterrupted, "unet_raw"))


def test_streaming_run_resumes_where_the_stream_stopped(tmp_path, digit_folder):
    settings = dict(max_train_steps=5, checkpointing_steps=3, data={"streaming": True})
    uninterrupted = tmp_path / "uninterrupted"
    train(make_config(uninterrupted, digit_folder, **settings))
    resumed = tmp_path / "resumed"
    train(make_config(resumed, digit_folder, resume_from_checkpoint=str(uninterrupted / "checkpoints/checkpoint-3"),
                      **settings))
    assert (uninterrupted / "checkpoints/checkpoint-3/data_state_0.json").is_file()
    assert_same_weights(saved_weights(resumed), saved_weights(uninterrupted))


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, digit_folder):
    # Warmup makes step 1's learning rate 0 and step 2's 1e32: the weights explode, and step 3's loss is inf.
    output_dir = tmp_path / "run"
    config = make_config(output_dir, digit_folder, learning_rate=1e33, lr_scheduler="constant_with_warmup",
                         lr_warmup_steps=10, max_train_steps=20, checkpointing_steps=1, logging_steps=5,
                         checkpoints_total_limit=None)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(noticed at step 3\)") as error:
        train(config)
    assert "checkpoint-2" in str(error.value)
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-1", "checkpoint-2"]
    assert not (output_dir / "model_index.json").exists()
    state = load_file(output_dir / "checkpoints/checkpoint-2/model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in state.values())


def test_flags_that_change_memory_layout_still_train_and_save(tmp_path, digit_folder):
    output_dir = tmp_path / "run"
    train(make_config(output_dir, digit_folder, max_train_steps=2, channels_last=True, gradient_checkpointing=True,
                      prediction_type="v_prediction", snr_gamma=5.0, use_ema=False))
    assert not (output_dir / "unet_raw").exists()  # without EMA the pipeline holds the trained weights
    assert all(torch.isfinite(tensor).all() for tensor in saved_weights(output_dir).values())


def test_push_to_hub_uploads_the_pipeline_and_never_the_token(tmp_path, digit_folder, monkeypatch):
    token = "hf_test_alice_4f1c9e2b7d"
    output_dir = tmp_path / "ddpm-micro"
    config = make_config(output_dir, digit_folder, max_train_steps=3, logger="tensorboard", push_to_hub=True,
                         hub_token=token, hub_private_repo=True)
    assert token not in repr(config) and token not in str(config.to_dict())
    with LocalHub(tmp_path / "hub", tokens={token: "alice"}) as hub:
        use_local_hub(monkeypatch, hub.url, home=tmp_path / "hf_home")
        train(config)  # a bare repo name: the output_dir's, under the token's user
        uploaded = set(HfApi(token=token).list_repo_files("alice/ddpm-micro"))
        received = [path for path in hub.objects.rglob("*") if path.is_file()]

    assert uploaded == {".gitattributes", "README.md", "model_index.json", "samples.png",  # no checkpoints, raw
                        "scheduler/scheduler_config.json", "unet/config.json", f"unet/{WEIGHTS}"}  # weights or logs
    record = json.loads((output_dir / "training_config.json").read_text())
    assert record["global_step"] == 3 and record["num_processes"] == 1 and "hub_token" not in record
    written = [path for path in output_dir.rglob("*") if path.is_file()]
    assert not [path for path in written + received if token.encode() in path.read_bytes()]



def test_hub_strategy_checkpoint_pushes_at_every_checkpoint_and_the_end(tmp_path, digit_folder, monkeypatch):
    token = "hf_test_alice_4f1c9e2b7d"
    output_dir = tmp_path / "ddpm-micro"
    config = make_config(output_dir, digit_folder, max_train_steps=4, checkpointing_steps=2, push_to_hub=True,
                         hub_token=token, hub_strategy="checkpoint")
    with LocalHub(tmp_path / "hub", tokens={token: "alice"}) as hub:
        use_local_hub(monkeypatch, hub.url, home=tmp_path / "hf_home")
        train(config)
        commits = [commit.title for commit in HfApi(token=token).list_repo_commits("alice/ddpm-micro")]
    assert any("Checkpoint at step 2" in title for title in commits)
    assert any("Trained for 4 steps" in title for title in commits)
    assert "Checkpoint at step 4" not in " ".join(commits)  # the end's push covers the last step
    card = (output_dir / "README.md").read_text()
    assert "library_name: diffusers" in card and token not in card

# --- bad input: a clear error before any compute, nothing written -----------------------------------


def bad_input_cases(tmp_path: Path, digit_folder: Path) -> dict[str, tuple[TrainingConfig, type, str]]:
    rgb_model = tmp_path / "rgb_unet.json"
    rgb_model.write_text('{"block_out_channels": [8, 16], "in_channels": 3, "out_channels": 3, '
                         '"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", '
                         '"UpBlock2D"], "norm_num_groups": 4}')
    (tmp_path / "not_a_checkpoint").mkdir()
    out = tmp_path / "out"
    return {
        "unknown preset": (make_config(out, model_config="huge"), ValueError,
                           "Unknown model preset 'huge': choose one of ddpm-cifar10, diffusers-example, tiny, micro"),
        "resolution": (make_config(out, data={"resolution": 10}, model_config="tiny"), ValueError,
                       "--resolution 10 is not divisible by 4"),
        "channels": (make_config(out, digit_folder, model_config=str(rgb_model)), ValueError,
                     "fixes in_channels=3, but the training images have 1 channel"),
        "resume path": (make_config(out, resume_from_checkpoint=str(tmp_path / "not_a_checkpoint")),
                        FileNotFoundError, "is not a checkpoint"),
        "missing folder": (make_config(out, tmp_path / "no_such_folder"), FileNotFoundError, "does not exist"),
        "too few images": (make_config(out, digit_folder, train_batch_size=65), ValueError,
                           "fewer than one batch of 65"),
    }


@pytest.mark.parametrize("case", ["unknown preset", "resolution", "channels", "resume path", "missing folder",
                                  "too few images"])
def test_bad_input_fails_early_and_writes_nothing(tmp_path, digit_folder, case):
    config, error_type, message = bad_input_cases(tmp_path, digit_folder)[case]
    with pytest.raises(error_type, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config)
    assert not Path(config.output_dir).exists()


def test_a_non_empty_output_dir_is_left_alone(tmp_path, digit_folder):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        train(make_config(output_dir, digit_folder))
    assert [path.name for path in output_dir.iterdir()] == ["notes.txt"]


def test_a_launch_whose_processes_do_not_see_each_other_is_refused(tmp_path, monkeypatch):
    # What `accelerate launch --multi_gpu --num_processes 2` does on a machine without GPUs: each of the
    # two processes gets WORLD_SIZE=2 but initialises no process group, and would train alone.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2"):
        train(make_config(tmp_path / "out"))


def test_latest_ignores_half_written_checkpoints(tmp_path, caplog):
    PartialState()  # Accelerate's logger, which find_checkpoint warns through, needs it
    checkpoints = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp", "checkpoint-x"):
        (checkpoints / name).mkdir(parents=True)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert find_checkpoint(tmp_path, "latest") is None  # neither has the marker of a finished save
    assert "Skipping checkpoint-10" in caplog.text and "checkpoint_complete.json is missing" in caplog.text
    assert find_checkpoint(tmp_path / "empty", "latest") is None


def test_eval_every_logs_sample_quality_and_puts_the_last_in_the_model_card(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf_home"))  # the reference statistics' cache
    output_dir = tmp_path / "run"
    train(make_config(output_dir, max_train_steps=6, eval_every=4, eval_num_samples=20, eval_steps=3,
                      logger="tensorboard"))

    events = EventAccumulator(str(output_dir / "logs" / "ddpm_hf"))
    events.Reload()
    distances = events.Scalars("eval/frechet_distance")
    assert [event.step for event in distances] == [4, 6]  # every 4 steps, and at the end
    assert all(np.isfinite(event.value) and event.value > 0 for event in distances)
    assert 0 <= events.Scalars("eval/confidence")[-1].value <= 1
    assert {"eval/kid", "eval/precision", "eval/recall", "eval/class_coverage"} <= set(events.Tags()["scalars"])

    record = json.loads((output_dir / "eval_results.json").read_text())
    assert record["num_samples"] == 20 and record["features"].startswith("digits")
    assert (record["scheduler"], record["steps"]) == ("dpm-solver-sde", 3)  # the fast sampler, not the grids' 5 steps
    assert record["frechet_distance"] == pytest.approx(distances[-1].value, rel=1e-5)
    assert record["floor"]["num_images"] == 20 and record["floor"]["description"] == "digits, split test, 8 px"
    card = (output_dir / "README.md").read_text()
    assert f"{record['frechet_distance']:.4g}" in card and "Measured on 20 samples (dpm-solver-sde, 3 steps)" in card
    assert f"held-out real images (digits, split test, 8 px), the floor no model can be expected to beat, is " \
           f"{record['floor']['frechet_distance']:.4g}" in card
    metrics = {result.metric_type for result in ModelCard.load(output_dir / "README.md").data.eval_results}
    assert "seconds" not in metrics and "frechet_distance" in metrics
    assert "\n# run\n" in card and "your-username/run" in card and ".tmp" not in card  # named after output_dir
    assert any(hf_constants.HF_HOME in str(path) for path in (tmp_path / "hf_home").rglob("*.npz"))


def test_a_run_ends_by_measuring_its_quality_beside_the_real_digits(tmp_path, digit_folder, monkeypatch, caplog):
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("DDPM_HF_INCEPTION_WEIGHTS", raising=False)
    with caplog.at_level("INFO", logger="ddpm_hf.training.loop"):
        train(make_config(tmp_path / "digits", max_train_steps=2, eval_at_end=True, eval_num_samples=12, eval_steps=2))
        train(make_config(tmp_path / "folder", digit_folder, max_train_steps=2, eval_at_end=True))
    record = json.loads((tmp_path / "digits" / "eval_results.json").read_text())
    assert (record["num_samples"], record["scheduler"], record["steps"]) == (12, "dpm-solver-sde", 2)
    line = next(message for message in caplog.messages if "FD_digits" in message)
    floor = record["floor"]
    assert (f"Step 2: FD_digits {record['frechet_distance']:.2f} (real digits: {floor['frechet_distance']:.2f} ± "
            f"{floor['std']:.2f})") in line
    assert not (tmp_path / "folder" / "eval_results.json").exists()  # other images need Inception: skipped
    assert any("will not be measured at the end" in message for message in caplog.messages)


def test_eval_every_on_images_other_than_the_digits_needs_the_inception_weights(tmp_path, digit_folder, monkeypatch):
    monkeypatch.delenv("DDPM_HF_INCEPTION_WEIGHTS", raising=False)
    config = make_config(tmp_path / "out", digit_folder, eval_every=2)
    with pytest.raises(FileNotFoundError, match="--eval_inception_weights PATH"):
        train(config)
    assert not Path(config.output_dir).exists()
