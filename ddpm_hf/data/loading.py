"""Image data: a Hub dataset, a local image folder or the embedded digits, as `[-1, 1]` image tensors.

[`load_train_data`] turns a [`DataConfig`] into a torch dataset whose items are float32 `(C, H, W)`
tensors. Map-style data is decoded and validated once, at load time, into uint8 tensors; each epoch
only crops, flips and scales. With `streaming=True` the images are decoded on the fly from a
`datasets` stream sharded per process, which can resume mid-epoch through `state_dict()`.

Every dataset has `set_epoch(epoch)`, and its random crops and flips depend only on
`(seed, epoch, example)`, so a resumed run sees exactly the batches of an uninterrupted one.
"""

import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from tqdm.auto import tqdm

from .digits import DIGITS_NAME, load_digits_images
from .preprocessing import BAD_IMAGE_ERRORS, RandomCropFlip, image_channels, open_image, prepare_image, to_model_range

logger = logging.getLogger(__name__)

# Column names tried, in order, when the dataset has several image columns (cifar10 calls it "img").
IMAGE_COLUMN_NAMES = ("image", "img")
# How many unreadable files an error message names before summarising the rest as a count.
_NAMED_BAD_IMAGES = 5


@dataclass
class DataConfig:
    """Where the training images come from and how they are preprocessed. Field names are the CLI flags."""

    dataset_name: str | None = None  # Hub id (uoft-cs/cifar10, ylecun/mnist, ...); no source at all: embedded digits
    dataset_config_name: str | None = None  # the Hub dataset's configuration, when it has several
    split: str = "train"  # the split to train on
    train_data_dir: str | None = None  # local image folder, read with datasets' "imagefolder" builder
    image_column: str | None = None  # the column of images; unset: "image", "img" or the only image column
    resolution: int = 16  # side of the square training images
    center_crop: bool = False  # crop the center once, instead of a random crop every epoch (square images: no-op)
    random_flip: bool = False  # horizontal flips; leave off for digits and text
    pad_to_resolution: bool = False  # pad smaller images with black instead of upscaling them (MNIST 28 -> 32)
    num_channels: int | None = None  # 1 or 3; unset: follow the data (1 if every image is grayscale, else 3)
    streaming: bool = False  # decode on the fly from a stream, for data larger than the disk
    shuffle_buffer_size: int = 0  # streaming: shuffle through a buffer; > 0 makes resume inexact (buffer is lost)
    skip_bad_images: bool = False  # train on the readable images instead of stopping at unreadable ones
    cache_dir: str | None = None  # where `datasets` caches downloads and the decoded folder
    max_train_samples: int | None = None  # a random subset of this size (chosen with the seed), for quick runs

    def __post_init__(self):
        if self.resolution <= 0:
            raise ValueError(f"--resolution must be a positive number of pixels, got {self.resolution}.")
        if self.num_channels not in (None, 1, 3):
            raise ValueError(f"--num_channels must be 1 (grayscale) or 3 (RGB), got {self.num_channels}.")
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise ValueError(f"--max_train_samples must be positive, got {self.max_train_samples}.")
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"--shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size}.")
        if self.dataset_name is not None and self.train_data_dir is not None:
            raise ValueError("Pass either --dataset_name or --train_data_dir, not both.")
        if self.streaming and self.dataset_name is None and self.train_data_dir is None:
            raise ValueError("--streaming needs --dataset_name or --train_data_dir; the embedded digits fit in memory.")


@dataclass
class TrainData:
    """A ready-to-batch training set and what the model and logs need to know about it."""

    dataset: torch.utils.data.Dataset | torch.utils.data.IterableDataset  # float32 (C, H, W) in [-1, 1]
    num_channels: int  # the UNet's in_channels and out_channels
    num_examples: int | None  # None when streaming
    name: str  # the source, for logs and model cards
    skipped_images: int = 0  # unreadable images left out with skip_bad_images (map-style data; a stream logs them)


class SharedEpoch:
    """An epoch counter in shared memory, so that `set_epoch()` also reaches persistent DataLoader workers."""

    def __init__(self):
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()

    def set(self, epoch: int):
        self._value.fill_(epoch)

    def get(self) -> int:
        return int(self._value)


class ImageTensorDataset(torch.utils.data.Dataset):
    """Decoded uint8 images; each item is randomly cropped and flipped for `(epoch, index)`, then scaled to [-1, 1].

    Args:
        images (`torch.Tensor` or list of `torch.Tensor`): uint8 `(C, H, W)` images with `min(H, W)` at
            least the crop size: one `(N, C, H, W)` tensor, or a list when sizes differ.
        augment (`RandomCropFlip`): The per-example crop and flip.
    """

    def __init__(self, images: torch.Tensor | list[torch.Tensor], augment: RandomCropFlip):
        self.images = images
        self.augment = augment
        self._epoch = SharedEpoch()

    def set_epoch(self, epoch: int):
        self._epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model_range(self.augment(self.images[index], self._epoch.get(), index))


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Images decoded and augmented on the fly from a `datasets` stream (already sharded for this process).

    `state_dict()` / `load_state_dict()` checkpoint the position in the stream, so that a resumed run
    continues at the next example, with the crops and flips it would have had.

    Args:
        source (`datasets.IterableDataset`): Rows whose `image_column` holds undecoded images.
        image_column (`str`): The column to read.
        prepare (`Callable`): PIL image -> uint8 `(C, H, W)` tensor (see [`prepare_image`]).
        augment (`RandomCropFlip`): The per-example crop and flip.
        skip_bad_images (`bool`): Log and skip unreadable images instead of raising.
        process_index (`int`): This process's rank, so that ranks draw different crops for the same position.
    """

    def __init__(
        self,
        source: datasets.IterableDataset,
        image_column: str,
        prepare: Callable[..., torch.Tensor],
        augment: RandomCropFlip,
        skip_bad_images: bool = False,
        process_index: int = 0,
    ):
        self.source = source
        self.image_column = image_column
        self.prepare = prepare
        self.augment = augment
        self.skip_bad_images = skip_bad_images
        self.process_index = process_index
        self._epoch = SharedEpoch()
        self._position = 0  # examples of this epoch read from `source`, skipped ones included
        self._resume_from: dict | None = None

    def set_epoch(self, epoch: int):
        self._epoch.set(epoch)
        self.source.set_epoch(epoch)  # reshuffles shards and buffer, if shuffling

    def state_dict(self) -> dict:
        """The position after the last example yielded."""
        return {"source": self.source.state_dict(), "epoch": self._epoch.get(), "position": self._position}

    def load_state_dict(self, state: dict):
        """Resume at the example after `state` the next time this epoch is iterated (as `datasets` does)."""
        self.source.load_state_dict(state["source"])
        self._resume_from = state

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self._epoch.get()
        resuming = self._resume_from is not None and self._resume_from["epoch"] == epoch
        self._position = self._resume_from["position"] if resuming else 0
        worker = torch.utils.data.get_worker_info()
        worker_id = 0 if worker is None else worker.id  # DataLoader workers each read their own shards
        for example in self.source:
            index = self._position
            self._position += 1
            value = example[self.image_column]
            try:
                image = open_image(value)
            except BAD_IMAGE_ERRORS as err:
                if not self.skip_bad_images:
                    raise ValueError(
                        f"Unreadable image {describe_image(value, index)} ({err}). "
                        "Pass --skip_bad_images to skip unreadable images."
                    ) from err
                logger.warning("Skipping unreadable image %s (%s).", describe_image(value, index), err)
                continue
            pixels = self.augment(self.prepare(image), epoch, self.process_index, worker_id, index)
            yield to_model_range(pixels)


def load_train_data(config: DataConfig, *, seed: int = 0, process_index: int = 0, num_processes: int = 1) -> TrainData:
    """Load, validate and preprocess the training images described by `config`.

    Everything that can be wrong with the data (unreachable dataset, missing or empty folder, missing
    column, unreadable files) raises here, before any training compute is spent. Map-style data is
    decoded now; a stream is opened and its first image read to find the channel count.

    Args:
        config (`DataConfig`): The source and preprocessing.
        seed (`int`): Seeds the random crops and flips and the `max_train_samples` subset.
        process_index (`int`): This process's rank; streaming reads only this rank's share.
        num_processes (`int`): The number of ranks sharing the stream.

    Returns:
        [`TrainData`] whose dataset yields float32 `(C, resolution, resolution)` tensors in [-1, 1].

    Example:

    ```py
    >>> data = load_train_data(DataConfig(resolution=16))  # the embedded digits
    >>> data.name, data.num_examples, data.dataset[0].shape
    ('sklearn digits (embedded)', 1797, torch.Size([1, 16, 16]))
    ```
    """
    augment = RandomCropFlip(config.resolution, config.random_flip, seed)
    if config.dataset_name is None and config.train_data_dir is None:
        images = embedded_digits(config, seed)
        return TrainData(ImageTensorDataset(images, augment), images.shape[1], len(images), DIGITS_NAME)

    source, name = load_source(config)
    image_column = find_image_column(source.features, config.image_column, name)
    # Undecoded, so that we decode each image ourselves and can name the files that fail.
    source = source.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    if not config.streaming:
        images, skipped = decode_images(source, image_column, config, name, seed, show_progress=process_index == 0)
        return TrainData(ImageTensorDataset(images, augment), images[0].shape[0], len(images), name, skipped)

    num_channels = config.num_channels or first_image_channels(source, image_column, name)
    stream = shard_stream(source, config, seed, process_index, num_processes)
    prepare = functools.partial(preprocessing_for(config), num_channels=num_channels)
    dataset = StreamingImageDataset(stream, image_column, prepare, augment, config.skip_bad_images, process_index)
    return TrainData(dataset, num_channels, None, name)


def load_source(config: DataConfig) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    """The raw `datasets` split, and a name for it, with load failures turned into actionable errors."""
    if config.train_data_dir is not None:
        check_image_folder(config.train_data_dir)
        source = datasets.load_dataset(
            "imagefolder",
            data_dir=config.train_data_dir,
            split=config.split,
            cache_dir=config.cache_dir,
            streaming=config.streaming,
        )
        return source, f"image folder {config.train_data_dir}"
    try:
        source = datasets.load_dataset(
            config.dataset_name,
            config.dataset_config_name,
            split=config.split,
            cache_dir=config.cache_dir,
            streaming=config.streaming,
        )
    except Exception as err:  # offline, unknown id, no access, unknown split: all end training before it starts
        raise ValueError(
            f"Could not load dataset {config.dataset_name!r} ({type(err).__name__}: {err}). "
            "If you are offline, pass --train_data_dir with a local image folder, "
            "or set HF_HUB_OFFLINE=1 to use a copy already in the cache."
        ) from err
    return source, config.dataset_name


def check_image_folder(path: str):
    """Fail early, and clearly, on a missing folder or one without a single image file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--train_data_dir {path!r} does not exist.")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"--train_data_dir {path!r} is a file; pass the folder that holds the images.")
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    for _, _, files in os.walk(path):
        if any(os.path.splitext(file)[1].lower() in extensions for file in files):
            return
    raise ValueError(
        f"--train_data_dir {path!r} contains no images (looked for .png, .jpg, .jpeg, .webp, .bmp, ... in it "
        "and its subfolders)."
    )


def find_image_column(features: datasets.Features | None, requested: str | None, name: str) -> str:
    """`requested` if it is an image column, else "image", "img" or the dataset's only image column."""
    features = features or {}  # a stream can have unknown features
    image_columns = [column for column, feature in features.items() if isinstance(feature, datasets.Image)]
    available = ", ".join(f"{column} ({type(feature).__name__})" for column, feature in features.items()) or "unknown"
    if requested is not None:
        if requested not in features:
            raise ValueError(f"--image_column {requested!r} not found in {name}. Available columns: {available}.")
        if requested not in image_columns:
            raise ValueError(f"--image_column {requested!r} in {name} does not hold images. Columns: {available}.")
        return requested
    if len(image_columns) == 1:
        return image_columns[0]
    for column in IMAGE_COLUMN_NAMES:
        if column in image_columns:
            return column
    raise ValueError(
        f"Could not tell which column of {name} holds the training images. Available columns: {available}. "
        "Pass --image_column."
    )


def preprocessing_for(config: DataConfig) -> Callable[..., torch.Tensor]:
    """The load-time preprocessing `config` asks for: `(PIL image, num_channels)` -> uint8 `(C, H, W)`."""
    return functools.partial(
        prepare_image,
        resolution=config.resolution,
        center_crop=config.center_crop,
        pad_to_resolution=config.pad_to_resolution,
    )


def embedded_digits(config: DataConfig, seed: int) -> torch.Tensor:
    """scikit-learn's digits at `config.resolution`, `(N, C, H, W)` uint8: 1 channel unless `num_channels=3`."""
    images, _ = load_digits_images(config.resolution)
    if config.max_train_samples is not None:
        images = images[subset_indices(len(images), config.max_train_samples, seed)]
    return images.expand(-1, config.num_channels or 1, -1, -1).contiguous()


def subset_indices(num_examples: int, max_samples: int, seed: int) -> list[int]:
    """A random, seed-determined choice of `min(max_samples, num_examples)` indices, in dataset order."""
    chosen = np.random.default_rng(seed).permutation(num_examples)[:max_samples]
    return sorted(chosen.tolist())


def describe_image(value: dict, index: int) -> str:
    """A file name for error messages: the image's path, else its row number."""
    return value.get("path") or f"row {index}"


def decode_images(
    source: datasets.Dataset, image_column: str, config: DataConfig, name: str, seed: int, show_progress: bool = True
) -> tuple[torch.Tensor | list[torch.Tensor], int]:
    """Decode and preprocess every image once; unreadable ones raise, or with `skip_bad_images` are dropped.

    Returns one uint8 `(N, C, H, W)` tensor, or a list of `(C, H, W)` tensors when sizes differ (random crops
    of images with different aspect ratios), and the number of images skipped.
    """
    if len(source) == 0:
        raise ValueError(f"{name} has no rows in split {config.split!r}.")
    if config.max_train_samples is not None:
        source = source.select(subset_indices(len(source), config.max_train_samples, seed))
    prepare = preprocessing_for(config)
    images, bad_images = [], []
    for index, example in enumerate(tqdm(source, desc=f"Decoding {name}", unit="image", disable=not show_progress)):
        value = example[image_column]
        try:
            image = open_image(value)
            # Without --num_channels each image keeps its own channel count; they are matched below.
            images.append(prepare(image, config.num_channels or image_channels(image)))
        except BAD_IMAGE_ERRORS as error:
            file = describe_image(value, index)
            bad_images.append(f"{file} ({str(error).replace(repr(file), '').strip()})")  # PIL repeats the path
    report_bad_images(bad_images, len(source), name, config.skip_bad_images)

    num_channels = max(pixels.shape[0] for pixels in images)
    images = [pixels.expand(num_channels, -1, -1) for pixels in images]  # grayscale -> RGB when the data is mixed
    if all(pixels.shape == images[0].shape for pixels in images):
        return torch.stack(images), len(bad_images)  # one allocation, shared cheaply with DataLoader workers
    return images, len(bad_images)


def report_bad_images(bad_images: list[str], num_images: int, name: str, skip_bad_images: bool):
    """Raise on unreadable images naming the first few, or with `skip_bad_images`, warn with their count."""
    if not bad_images:
        return
    named = ", ".join(bad_images[:_NAMED_BAD_IMAGES])
    more = f" and {len(bad_images) - _NAMED_BAD_IMAGES} more" if len(bad_images) > _NAMED_BAD_IMAGES else ""
    summary = f"{len(bad_images)} of {num_images} images in {name} could not be read: {named}{more}."
    if len(bad_images) == num_images:
        raise ValueError(f"{summary} No readable images are left to train on.")
    if not skip_bad_images:
        raise ValueError(
            f"{summary} Fix or remove them, or pass --skip_bad_images to train on the other "
            f"{num_images - len(bad_images)}."
        )
    logger.warning("%s Training on the other %d (--skip_bad_images).", summary, num_images - len(bad_images))


def shard_stream(
    source: datasets.IterableDataset, config: DataConfig, seed: int, process_index: int, num_processes: int
) -> datasets.IterableDataset:
    """This process's share of the (optionally shuffled and truncated) stream."""
    if config.shuffle_buffer_size > 0:
        source = source.shuffle(seed=seed, buffer_size=config.shuffle_buffer_size)
    if config.max_train_samples is not None:
        source = source.take(config.max_train_samples)  # before sharding: the limit is for all ranks together
    return split_dataset_by_node(source, rank=process_index, world_size=num_processes)


def first_image_channels(source: datasets.IterableDataset, image_column: str, name: str) -> int:
    """The channel count of the first readable image in the stream (1 grayscale, 3 otherwise)."""
    for example in source:
        try:
            return image_channels(open_image(example[image_column]))
        except BAD_IMAGE_ERRORS:
            continue
    raise ValueError(f"{name} has no readable images.")
