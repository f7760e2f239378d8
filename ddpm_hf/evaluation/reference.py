"""Reference image sets and their feature statistics, cached on disk.

A reference is the embedded digits (`"digits"`, splits "train", "test", "all"), a Hub dataset id
(`"uoft-cs/cifar10"`) or a local image folder. Its images are prepared as training prepares them
(resize the shorter side to the samples' resolution, center crop) but never upscaled and never
converted between grayscale and RGB: a reference smaller than the samples, or with another channel
count, is an error rather than a silently distorted baseline.

Statistics are cached in `cache_dir` (default: `$HF_HOME/ddpm_hf/reference_stats`), one `.npz`
per (reference, dataset config, split, resolution, extractor, image count); a local folder's key also
holds its number of image files and their newest modification time, so editing it invalidates the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from huggingface_hub import constants
from tqdm.auto import tqdm

from ..data.loading import DataConfig, find_image_column, load_source, subset_indices
from ..data.preprocessing import BAD_IMAGE_ERRORS, image_channels, open_image, prepare_image
from ..utils.atomic_files import atomic_write
from .digits_classifier import digits_split
from .features import FeatureExtractor, compute_features
from .metrics import FeatureStats

DIGITS = "digits"
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class ReferenceStats:
    """The feature statistics of a reference image set, and what the samples compared with it must match."""

    stats: FeatureStats
    num_channels: int  # 1 grayscale, 3 RGB
    resolution: int  # the side of the (square) images the features were computed from
    description: str  # e.g. "digits, split test, 16 px", for reports


def reference_for_training(data: DataConfig) -> dict[str, Any]:
    """The reference arguments of `evaluate_pipeline` / `prepare_reference` for a model trained on `data`.

    The embedded digits are compared with their train split through the digits classifier; a Hub dataset
    or an image folder with itself (same split, configuration and column) through the Inception features,
    whose weights must then be given (`DDPM_HF_INCEPTION_WEIGHTS`).
    """
    if data.dataset_name is None and data.train_data_dir is None:
        return {"reference": DIGITS, "split": "train", "features": "digits"}
    return {"reference": data.train_data_dir or data.dataset_name, "split": data.split,
            "dataset_config_name": data.dataset_config_name, "image_column": data.image_column,
            "features": "inception"}


def default_cache_dir() -> Path:
    return Path(constants.HF_HOME) / "ddpm_hf" / "reference_stats"


def reference_stats(
    extractor: FeatureExtractor,
    reference: str = DIGITS,
    split: str = "train",
    resolution: int = 16,
    *,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    max_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> ReferenceStats:
    """The statistics of `extractor`'s features on a reference set, from the cache or computed and cached.

    Args:
        extractor ([`FeatureExtractor`]): The features to summarise.
        reference (`str`): "digits", a Hub dataset id or a local image folder.
        split (`str`): The split ("train", "test", ...). An image folder without split subfolders has "train".
        resolution (`int`): The side of the samples the reference will be compared with.
        dataset_config_name (`str`, *optional*): The Hub dataset's configuration, when it has several.
        image_column (`str`, *optional*): The column of images; by default "image", "img" or the only one.
        max_images (`int`, *optional*): Use a fixed random subset of this many images.
        cache_dir (`str`, *optional*): Where the statistics are cached; `None`: `$HF_HOME/ddpm_hf/reference_stats`.
        batch_size (`int`): Images per feature-extractor call.

    Raises:
        ValueError: if the reference cannot be loaded, or its images are smaller than `resolution`.
    """
    is_folder = reference != DIGITS and os.path.isdir(reference)
    key = {
        "reference": os.path.abspath(reference) if is_folder else reference,
        "dataset_config_name": dataset_config_name,
        "split": split,
        "image_column": image_column,
        "resolution": resolution,
        "extractor": extractor.name,
        "max_images": max_images,
        "folder": _image_files(reference) if is_folder else None,  # (count, newest modification time)
    }
    path = Path(cache_dir or default_cache_dir()) / f"{_cache_name(key)}.npz"
    if path.is_file():
        return _load(path)

    images, description = load_reference_images(
        reference, split, resolution, dataset_config_name=dataset_config_name, image_column=image_column,
        max_images=max_images,
    )
    features = compute_features(extractor, images, batch_size)
    result = ReferenceStats(FeatureStats.from_features(features), images.shape[1], resolution, description)
    _save(path, result, key)
    return result


def load_reference_images(
    reference: str,
    split: str,
    resolution: int,
    *,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    max_images: int | None = None,
) -> tuple[torch.Tensor, str]:
    """The reference images as uint8 `(N, C, resolution, resolution)`, and a description of them."""
    if reference == DIGITS:
        images, _ = digits_split(split, resolution)
        if max_images is not None:
            images = images[subset_indices(len(images), max_images, seed=0)]
        return images, f"digits, split {split}, {resolution} px"

    is_folder = os.path.isdir(reference)
    if is_folder and _image_files(reference)[0] == 0:
        raise ValueError(f"The reference folder {reference} holds no images ({', '.join(sorted(_IMAGE_EXTENSIONS))}).")
    config = DataConfig(
        dataset_name=None if is_folder else reference,
        train_data_dir=reference if is_folder else None,
        dataset_config_name=dataset_config_name,
        split=split,
        image_column=image_column,
        resolution=resolution,
    )
    try:
        source, name = load_source(config)
    except ValueError as error:
        cause = error.__cause__ or error
        if is_folder:
            raise ValueError(f"Could not read the reference folder {reference} ({cause}).") from error
        raise ValueError(
            f"The reference {reference!r} is neither a local folder nor a loadable Hub dataset "
            f"({type(cause).__name__}: {cause}). Pass an image folder, or a Hub dataset id (offline: one already "
            "in the cache, with HF_HUB_OFFLINE=1)."
        ) from error
    column = find_image_column(source.features, image_column, name)
    source = source.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    if max_images is not None:
        source = source.select(subset_indices(len(source), max_images, seed=0))
    images = _decode(source, column, resolution, name)
    return images, f"{name}, split {split}, {resolution} px"


def _decode(source: datasets.Dataset, column: str, resolution: int, name: str) -> torch.Tensor:
    """Decode, downscale and center crop every image; grayscale and RGB stay as they are, mixed sets become RGB."""
    if len(source) == 0:
        raise ValueError(f"The reference {name} has no images.")
    images, too_small = [], []
    for index, example in enumerate(tqdm(source, desc=f"Reading {name}", unit="image", leave=False)):
        try:
            image = open_image(example[column])
        except BAD_IMAGE_ERRORS as error:
            raise ValueError(f"Unreadable reference image {example[column].get('path') or index}: {error}") from error
        if min(image.size) < resolution:
            too_small.append(image.size)
            continue
        images.append(prepare_image(image, image_channels(image), resolution, center_crop=True))
    if too_small:
        width, height = too_small[0]
        raise ValueError(
            f"{len(too_small)} of {len(source)} images in the reference {name} are smaller than the samples' "
            f"{resolution} px (e.g. {width}x{height}); an upscaled reference would be blurrier than the data and "
            "inflate the distance. Compare with a reference at least as large as the samples."
        )
    num_channels = max(pixels.shape[0] for pixels in images)
    return torch.stack([pixels.expand(num_channels, -1, -1) for pixels in images])


def _image_files(folder: str) -> tuple[int, float]:
    """The number of image files under `folder` and their newest modification time."""
    count, newest = 0, 0.0
    for root, _, files in os.walk(folder):
        for file in files:
            if os.path.splitext(file)[1].lower() in _IMAGE_EXTENSIONS:
                count += 1
                newest = max(newest, os.path.getmtime(os.path.join(root, file)))
    return count, newest


def _cache_name(key: dict) -> str:
    """A readable, unique file name: the reference, split, resolution and extractor, then a hash of the whole key."""
    readable = f"{key['reference']}-{key['split']}-{key['resolution']}px-{key['extractor']}"
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", readable).strip("_")[-120:]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def _save(path: Path, reference: ReferenceStats, key: dict):
    """Write atomically, so that a concurrent or interrupted run never reads half a file."""
    stats = reference.stats
    with atomic_write(path) as temporary, open(temporary, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, features=stats.features, num_images=stats.num_images,
                 num_channels=reference.num_channels, resolution=reference.resolution,
                 description=reference.description, key=json.dumps(key, sort_keys=True))


def _load(path: Path) -> ReferenceStats:
    with np.load(path) as data:
        stats = FeatureStats(data["mu"], data["sigma"], data["features"], int(data["num_images"]))
        return ReferenceStats(stats, int(data["num_channels"]), int(data["resolution"]), str(data["description"]))
