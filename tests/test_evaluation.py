"""Evaluation: the metrics against direct computations, the digits classifier, reference caching, bad input."""

import time

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ddpm_hf.evaluation import (
    DigitsFeatures,
    InceptionFeatures,
    digits_split,
    evaluate_images,
    evaluate_pipeline,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
    reference_for_training,
    reference_stats,
)
from ddpm_hf.evaluation import evaluate as evaluate_module
from ddpm_hf.evaluation import reference as reference_module
from ddpm_hf.evaluation.digits_classifier import classifier_accuracy

from ddpm_hf.training import DataConfig
from helpers import make_pipeline


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One reference-statistics cache for the module, so that the digits' statistics are computed once."""
    return tmp_path_factory.mktemp("reference_stats")


@pytest.fixture(scope="module")
def held_out_digits():
    images, labels = digits_split("test")
    return images


def random_gaussian(rng, dim):
    mu = rng.normal(size=dim)
    a = rng.normal(size=(dim, dim))
    return mu, a @ a.T + 0.1 * np.eye(dim)


def frechet_distance_with_sqrtm(mu1, sigma1, mu2, sigma2):
    """The textbook formula, as pytorch-fid writes it."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy_sqrtm_on_known_gaussians():
    rng = np.random.default_rng(0)
    for dim in (1, 4, 32):
        (mu1, sigma1), (mu2, sigma2) = random_gaussian(rng, dim), random_gaussian(rng, dim)
        expected = frechet_distance_with_sqrtm(mu1, sigma1, mu2, sigma2)
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
        assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # For diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    var1, var2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])  # one singular covariance
    expected = 1 + 0 + 9 + (1 - 3) ** 2 + (2 - 1) ** 2 + (0 - np.sqrt(2)) ** 2
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="Mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    shifted = rng.normal(size=(500, 16)) + 0.5
    same_mean, same_std = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted_mean, _ = kernel_inception_distance(a, shifted, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 20 * max(abs(same_mean), same_std)


def test_precision_and_recall_tell_fidelity_from_coverage():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    assert min(precision_recall(real, rng.normal(size=(400, 8)))) > 0.8
    # Samples from one small region of the real distribution: all look real, little of it is covered.
    collapsed = 0.1 * rng.normal(size=(400, 8))
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.2


def test_shipped_digits_classifier_reads_held_out_digits():
    assert classifier_accuracy(DigitsFeatures().classifier, "test") > 0.97  # 0.992 when shipped


def test_held_out_digits_are_far_closer_to_the_train_split_than_noise(cache_dir, held_out_digits):
    real = evaluate_images(held_out_digits, cache_dir=cache_dir)
    noise = evaluate_images(torch.rand(len(held_out_digits), 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                            cache_dir=cache_dir)
    assert real.frechet_distance < 10  # 4.5
    assert noise.frechet_distance > 20 * real.frechet_distance  # 545
    assert real.kid < noise.kid / 100
    assert real.confidence > 0.95 and real.class_coverage == 1.0
    assert real.confident_share > 0.9 and noise.confident_share < 0.2  # read with probability >= 0.9 (0.94, 0.09)
    assert real.precision > 0.8 and noise.precision < 0.1
    assert (real.num_samples, real.num_reference) == (360, 1437)


def test_reference_statistics_are_cached(tmp_path, monkeypatch):
    extractor = DigitsFeatures()
    start = time.perf_counter()
    first = reference_stats(extractor, "digits", "test", resolution=12, cache_dir=tmp_path)
    first_time = time.perf_counter() - start
    [cached] = tmp_path.glob("*.npz")
    assert "digits-test-12px-digits-classifier" in cached.name

    def no_loading(*args, **kwargs):
        raise AssertionError("a cache hit must not load the reference images")

    monkeypatch.setattr(reference_module, "load_reference_images", no_loading)
    start = time.perf_counter()
    second = reference_stats(extractor, "digits", "test", resolution=12, cache_dir=tmp_path)
    assert time.perf_counter() - start < first_time
    np.testing.assert_array_equal(second.stats.mu, first.stats.mu)
    np.testing.assert_array_equal(second.stats.sigma, first.stats.sigma)
    assert (second.num_channels, second.resolution, second.stats.num_images) == (1, 12, 360)
    with pytest.raises(AssertionError, match="cache hit"):  # another resolution is another key
        reference_stats(extractor, "digits", "test", resolution=16, cache_dir=tmp_path)


def test_image_folder_reference_is_downscaled_and_recomputed_when_edited(tmp_path):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    folder.mkdir()
    digits, _ = digits_split("test", resolution=32)
    for index in range(4):
        Image.fromarray(digits[index, 0].numpy()).save(folder / f"{index}.png")
    with pytest.warns(UserWarning, match="Only 4 reference images"), pytest.warns(UserWarning, match="Only 4 gen"):
        first = evaluate_images(digits_split("test", resolution=16)[0][:4], reference=str(folder), cache_dir=cache)
    assert first.reference.endswith("split train, 16 px") and first.num_reference == 4
    assert first.frechet_distance < 50  # the same four digits, rendered at 16 px vs downscaled from 32 px
    Image.fromarray(digits[4, 0].numpy()).save(folder / "4.png")
    second = reference_stats(DigitsFeatures(), str(folder), "train", 16, cache_dir=cache)
    assert second.stats.num_images == 5 and len(list(cache.glob("*.npz"))) == 2


def test_too_few_samples_warn_with_the_number(cache_dir, held_out_digits):
    with pytest.warns(UserWarning, match="Only 50 generated images.*at least 256"):
        evaluate_images(held_out_digits[:50], cache_dir=cache_dir)


def test_channel_mismatch_with_the_reference_is_an_error(cache_dir, held_out_digits):
    rgb = held_out_digits.expand(-1, 3, -1, -1)
    with pytest.raises(ValueError, match=r"3 channel\(s\) \(RGB\).*digits, split train.*1 \(grayscale\)"):
        evaluate_images(rgb, features=DigitsFeatures(), cache_dir=cache_dir)


def test_reference_smaller_than_the_samples_is_an_error(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    for index in range(3):
        Image.new("L", (8, 8), color=index * 80).save(folder / f"{index}.png")
    with pytest.raises(ValueError, match=r"3 of 3 images .* smaller than the samples' 16 px \(e.g. 8x8\)"):
        reference_stats(DigitsFeatures(), str(folder), "train", 16, cache_dir=tmp_path / "cache")


def test_missing_reference_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="neither a local folder nor a loadable Hub dataset"):
        reference_stats(DigitsFeatures(), str(tmp_path / "no-such-folder"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="splits train, test, all"):
        reference_stats(DigitsFeatures(), "digits", "validation", cache_dir=tmp_path)


def test_rgb_pipeline_against_digits_fails_before_sampling(cache_dir, tiny_unet_config, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("bad input must fail before any image is generated")

    monkeypatch.setattr(evaluate_module, "generate_images", no_sampling)
    with pytest.raises(ValueError, match="channel"):
        evaluate_pipeline(make_pipeline(tiny_unet_config), num_samples=8, cache_dir=cache_dir)  # an RGB model


def test_missing_inception_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_HF_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="--inception-weights PATH.*DDPM_HF_INCEPTION_WEIGHTS"):
        InceptionFeatures()
    missing = tmp_path / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match=f"not found at {missing}.*does not download"):
        InceptionFeatures(missing)
    monkeypatch.setenv("DDPM_HF_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        evaluate_images(torch.zeros(4, 3, 8, 8), features="inception", cache_dir=tmp_path)


class StandInInception(torch.nn.Module):
    """The interface of NVIDIA's TorchScript Inception: [0, 255] RGB images in, 2048 features out."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.shape[1] == 3
        per_channel = images.mean(dim=(2, 3))  # (B, 3)
        return per_channel.repeat(1, 683)[:, :2048]


def test_inception_features_feed_the_torchscript_file_rgb_in_0_255(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(StandInInception()).save(str(path))
    extractor = InceptionFeatures(path)
    features = extractor(torch.full((2, 1, 8, 8), 0.5))  # grayscale: repeated to 3 channels
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, torch.full((2, 2048), 127.5))
    assert extractor.name.startswith("inception-")


def test_the_training_hook_call_scores_a_digits_model(cache_dir, tiny_unet_config):
    # What `--eval_every N --eval_num_samples K` runs: the reference follows the training data.
    config = dict(tiny_unet_config, in_channels=1, out_channels=1)
    pipe = make_pipeline(config)
    with pytest.warns(UserWarning, match="Only 4 generated images"):
        result = evaluate_pipeline(pipe, 4, num_inference_steps=2, seed=0,
                                   **reference_for_training(DataConfig(resolution=8)))
    assert result.reference == "digits, split train, 8 px" and result.num_samples == 4
    assert result.frechet_distance > 50  # an untrained model
    folder = reference_for_training(DataConfig(train_data_dir="my/images", split="validation"))
    assert (folder["reference"], folder["split"], folder["features"]) == ("my/images", "validation", "inception")
