"""Evaluate generated images against a reference set: `evaluate_pipeline(pipe)` or `evaluate_images(images)`."""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..pipelines import DDPMPipeline
from .features import DigitsFeatures, FeatureExtractor, compute_features, get_feature_extractor
from .floor import RealDataFloor, prepare_floor
from .metrics import FeatureStats, frechet_distance, kernel_inception_distance, precision_recall
from .reference import DIGITS, ReferenceStats, reference_stats

# A digit counts as read when the classifier gives its class at least this probability (for class coverage), and as
# clearly read at the stricter level (the share of samples that look like one digit beyond doubt).
CONFIDENT = 0.5
CLEARLY_READ = 0.9


@dataclass
class EvaluationResult:
    """Sample-quality metrics of one image set against one reference.

    Distances (Fréchet, KID) are better lower; precision, recall, confidence and coverage are better higher.
    """

    frechet_distance: float  # FID with the Inception features; "FD_digits" with the digits classifier's
    kid: float  # kernel inception distance (MMD^2, unbiased), same features
    kid_std: float  # its standard deviation over the random subsets
    precision: float  # share of samples that fall on the reference's feature manifold (k = 3)
    recall: float  # share of the reference that falls on the samples' feature manifold
    num_samples: int
    num_reference: int
    features: str  # the extractor's name (and weights fingerprint)
    reference: str  # which images the samples were compared with
    confidence: float | None = None  # digits features: the classifier's mean top-class probability
    class_coverage: float | None = None  # digits features: share of the 10 digits confidently read at least once
    confident_share: float | None = None  # digits features: share of samples read with probability >= 0.9
    floor: RealDataFloor | None = None  # the same distance for as many held-out real images, when measured

    def metrics(self) -> dict[str, float]:
        """The numeric metrics, for trackers (`accelerator.log({f"eval/{k}": v ...})`) and tables."""
        return {name: value for name, value in asdict(self).items()
                if isinstance(value, (int, float)) and not name.startswith("num_")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_images(images: torch.Tensor, **reference_kwargs: Any) -> EvaluationResult:
    """Compare `images` with a reference set: Fréchet distance, KID, precision and recall (and, with the digits
    features, classifier confidence and class coverage).

    Args:
        images (`torch.Tensor`): `(N, C, H, W)` uint8 in [0, 255], or float in [0, 1] (quantised to 8 bits
            first, as saving them as PNG would). Square.
        reference_kwargs: The reference set and features, see [`prepare_reference`]. By default the embedded
            digits' train split and the digits classifier.

    Raises:
        ValueError: if the images and the reference differ in channel count, or the reference cannot be used.
        FileNotFoundError: if the Inception features are asked for and their weights file is missing.

    Example:

    ```py
    >>> images = pipe(batch_size=360, output_type="pt").images
    >>> evaluate_images(images).frechet_distance  # vs the embedded digits
    >>> evaluate_images(images, reference="uoft-cs/cifar10", features="inception",
    ...                 inception_weights="inception-2015-12-05.pt")
    ```
    """
    images = _to_uint8(images)
    extractor, reference_set = prepare_reference(images.shape[1], images.shape[-1], **reference_kwargs)
    _warn_if_few(len(images), "generated images", extractor)
    return compare(images, extractor, reference_set)


def evaluate_pipeline(
    pipeline: DDPMPipeline,
    num_samples: int = 360,
    *,
    num_inference_steps: int | None = None,
    sample_batch_size: int = 64,
    seed: int = 0,
    show_progress: bool = False,
    floor_split: str | None = None,
    **reference_kwargs: Any,
) -> EvaluationResult:
    """Generate `num_samples` images with `pipeline` (see [`generate_images`]) and compare them with a reference.

    The reference and the features are checked (and the reference statistics computed or read from the
    cache) before any image is generated, so that bad input fails in seconds, not after sampling.

    Args:
        pipeline ([`DDPMPipeline`]): The model, with the scheduler to sample with.
        num_samples (`int`): Images to generate; 360 matches the digits' held-out split (the real-data floor).
        num_inference_steps (`int`, *optional*): Denoising steps; defaults to the scheduler's training steps.
        sample_batch_size (`int`): Images generated at a time.
        seed (`int`): Image i starts from the noise of seed + i.
        show_progress (`bool`): Show a progress bar over all denoising steps.
        floor_split (`str`, *optional*): A held-out split of the reference (the digits' "test"): its first
            `num_samples` images are scored too, as `result.floor` (see [`real_data_floor`]).
        reference_kwargs: The reference set and features, see [`prepare_reference`].

    Example (the embedded digits, the default reference):

    ```py
    >>> pipe = DDPMPipeline.from_pretrained("outputs/ddpm-digits")
    >>> result = evaluate_pipeline(pipe, num_samples=360, num_inference_steps=1000)
    >>> result.frechet_distance, result.confidence
    ```
    """
    extractor, reference_set, floor = prepare_evaluation(pipeline, num_samples, floor_split, **reference_kwargs)
    images = generate_images(pipeline, num_samples, batch_size=sample_batch_size,
                             num_inference_steps=num_inference_steps, seed=seed, show_progress=show_progress)
    result = compare(images, extractor, reference_set)
    result.floor = floor
    return result


def prepare_evaluation(
    pipeline: DDPMPipeline, num_samples: int, floor_split: str | None = None, **reference_kwargs: Any
) -> tuple[FeatureExtractor, ReferenceStats, RealDataFloor | None]:
    """Everything scoring `num_samples` images of `pipeline` needs, checked before any is generated: the features,
    the reference statistics (see [`prepare_reference`]) and, with `floor_split`, the real-data floor."""
    size = pipeline.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"Evaluation compares square images; the model makes {height}x{width} ones.")
    reference_kwargs.setdefault("device", pipeline.device)
    return prepare_scoring(pipeline.unet.config.in_channels, height, num_samples, floor_split, **reference_kwargs)


def prepare_scoring(
    num_channels: int, resolution: int, num_samples: int, floor_split: str | None = None, **reference_kwargs: Any
) -> tuple[FeatureExtractor, ReferenceStats, RealDataFloor | None]:
    """[`prepare_evaluation`] for images of `num_channels` x `resolution`^2 from anywhere (a training run scores
    samples of a model that is not a pipeline yet)."""
    extractor, reference_set = prepare_reference(num_channels, resolution, **reference_kwargs)
    floor = None
    if floor_split is not None:
        floor = prepare_floor(extractor, reference_set, floor_split, num_samples, **reference_kwargs)
    _warn_if_few(num_samples, "generated images", extractor)
    return extractor, reference_set, floor


def prepare_reference(
    num_channels: int,
    resolution: int,
    reference: str = DIGITS,
    split: str = "train",
    features: str | FeatureExtractor = "digits",
    *,
    inception_weights: str | os.PathLike | None = None,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    max_reference_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[FeatureExtractor, ReferenceStats]:
    """The feature extractor and the reference statistics for samples of `num_channels` x `resolution`^2.

    Args:
        num_channels (`int`), resolution (`int`): The samples' channel count and side.
        reference (`str`): "digits" (embedded), a Hub dataset id or a local image folder.
        split (`str`): The reference's split; the digits have "train" (1,437), "test" (360) and "all".
        features (`str` or [`FeatureExtractor`]): "digits", "inception", or an extractor.
        inception_weights (`str`, *optional*): The `inception-2015-12-05.pt` file, for `features="inception"`.
        dataset_config_name, image_column, cache_dir: See [`reference_stats`].
        max_reference_images (`int`, *optional*): Use a fixed random subset of the reference of this size.
        batch_size (`int`): Images per feature-extractor call.
        device: Where the feature extractor runs.

    Raises:
        ValueError: if the reference cannot be loaded or has another channel count than the samples.
        FileNotFoundError: if the Inception features are asked for and their weights file is missing.
    """
    extractor = get_feature_extractor(features, inception_weights, device)
    reference_set = reference_stats(
        extractor, reference, split, resolution, dataset_config_name=dataset_config_name, image_column=image_column,
        max_images=max_reference_images, cache_dir=cache_dir, batch_size=batch_size,
    )
    if num_channels != reference_set.num_channels:
        kinds = {1: "grayscale", 3: "RGB"}
        raise ValueError(
            f"The samples have {num_channels} channel(s) ({kinds.get(num_channels, '?')}) but the reference "
            f"{reference_set.description} has {reference_set.num_channels} "
            f"({kinds.get(reference_set.num_channels, '?')}): compare with a reference of the kind the model "
            "was trained on."
        )
    _warn_if_few(reference_set.stats.num_images, f"reference images ({reference_set.description})", extractor)
    return extractor, reference_set


def compare(images: torch.Tensor, extractor: FeatureExtractor, reference_set: ReferenceStats) -> EvaluationResult:
    """The metrics of uint8 `images` against prepared reference statistics."""
    generated = FeatureStats.from_features(compute_features(extractor, images))
    real = reference_set.stats
    kid, kid_std = kernel_inception_distance(generated.features, real.features)
    precision, recall = precision_recall(real.features, generated.features)
    result = EvaluationResult(
        frechet_distance=frechet_distance(generated.mu, generated.sigma, real.mu, real.sigma),
        kid=kid, kid_std=kid_std, precision=precision, recall=recall,
        num_samples=len(images), num_reference=real.num_images,
        features=extractor.name, reference=reference_set.description,
    )
    if isinstance(extractor, DigitsFeatures):
        result.confidence, result.class_coverage, result.confident_share = digit_confidence_and_coverage(
            extractor, images)
    return result


StepCallback = Callable[[DDPMPipeline, int, torch.Tensor, dict], "dict | None"]


def generate_images(
    pipeline: DDPMPipeline,
    num_images: int,
    *,
    batch_size: int = 64,
    num_inference_steps: int | None = None,
    seed: int = 0,
    first_batch_callback: StepCallback | None = None,
    show_progress: bool = False,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Sample `num_images` images as uint8 `(N, C, H, W)`, `batch_size` at a time.

    Image i starts from the noise of `torch.Generator().manual_seed(seed + i)`, drawn on the CPU, so the
    images do not depend on `batch_size`, and the starting noise is the same on every device.
    `num_inference_steps` defaults to the scheduler's `num_train_timesteps`. `first_batch_callback` (e.g. a
    [`DenoisingRecorder`]) sees the steps of the first batch. With `bar`, the steps advance that progress bar
    (one over several calls) instead of a new one.
    """
    if num_images < 1:
        raise ValueError(f"The number of images must be positive, got {num_images}.")
    steps = num_inference_steps or pipeline.scheduler.config.num_train_timesteps
    num_batches = math.ceil(num_images / batch_size)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=num_batches * steps, desc=f"Sampling {num_images} images", unit="step",
                   disable=not show_progress)

    def count_step(pipe, step_index, timestep, state):
        bar.update()

    def count_and_call(pipe, step_index, timestep, state):
        bar.update()
        return first_batch_callback(pipe, step_index, timestep, state)

    batches = []
    with _quiet(pipeline):
        for start in range(0, num_images, batch_size):
            size = min(batch_size, num_images - start)
            callback = count_and_call if start == 0 and first_batch_callback is not None else count_step
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(size)]
            images = pipeline(batch_size=size, generator=generators, num_inference_steps=steps, output_type="pt",
                              callback_on_step_end=callback).images
            batches.append(_to_uint8(images.cpu()))
    if own_bar:
        bar.close()
    return torch.cat(batches)


@torch.no_grad()
def digit_confidence_and_coverage(
    extractor: DigitsFeatures, images: torch.Tensor, batch_size: int = 256
) -> tuple[float, float, float]:
    """The classifier's mean top-class probability on uint8 images; the share of the ten digits it reads
    confidently (probability >= 0.5) in at least one image: 1.0 when every digit appears, 0.1 for a model
    that draws a single digit, low for blobs no class claims; and the share of images it reads with probability
    >= 0.9 (clearly one digit)."""
    probabilities = torch.cat([extractor.class_probabilities(batch.float() / 255).cpu()
                               for batch in images.split(batch_size)])
    top, predicted = probabilities.max(dim=1)
    confident_classes = predicted[top >= CONFIDENT].unique()
    clearly_read = (top >= CLEARLY_READ).float().mean().item()
    return top.mean().item(), len(confident_classes) / probabilities.shape[1], clearly_read


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"Expected square images of shape (N, C, H, W), got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def _warn_if_few(count: int, what: str, extractor: FeatureExtractor):
    if count < extractor.min_samples:
        warnings.warn(
            f"Only {count} {what}: the Fréchet distance with {extractor.feature_dim}-d {extractor.name} features "
            f"needs at least {extractor.min_samples} for a stable estimate. Compare numbers computed from the "
            "same number of images only.",
            stacklevel=3,
        )


@contextmanager
def _quiet(pipeline: DDPMPipeline) -> Iterator[None]:
    """Silence the pipeline's own progress bar (one bar covers all batches), then restore its settings."""
    saved = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipeline._progress_bar_config = saved
