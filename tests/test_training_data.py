"""Training data: real image files in tmp folders read through `datasets`, checked pixel by pixel."""

import logging
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.data import DataConfig, TrainData, load_train_data
from ddpm_hf.data import DIGITS_NAME, load_digits_images


def write_image(path: Path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def load(folder: Path, seed: int = 0, **config) -> TrainData:
    """`load_train_data` on an image folder, caching inside the test's tmp_path."""
    config = DataConfig(train_data_dir=str(folder), cache_dir=str(folder.parent / "hf_cache"), **config)
    return load_train_data(config, seed=seed)


def as_uint8(image: torch.Tensor) -> np.ndarray:
    """[-1, 1] back to the 0..255 pixel values it came from."""
    return ((image + 1) * 127.5).round().to(torch.uint8).numpy()


def column_ramp(height: int, width: int) -> np.ndarray:
    """A grayscale image whose pixel value is its column index, so a crop tells where it was taken."""
    return np.tile(np.arange(width, dtype=np.uint8), (height, 1))


@pytest.fixture
def grey_levels(tmp_path) -> Path:
    """Seven flat 4x4 grayscale images with levels 0, 10, ..., 60: each item names its source file."""
    for level in range(0, 70, 10):
        write_image(tmp_path / "images" / f"{level:02d}.png", np.full((4, 4), level, np.uint8))
    return tmp_path / "images"


# --- shapes, ranges and exact values ------------------------------------------------------------


def test_mixed_sizes_and_formats_become_square_tensors_in_range(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "images" / "a.png", rng.integers(0, 256, (20, 30, 3), np.uint8))
    write_image(tmp_path / "images" / "b.jpg", rng.integers(0, 256, (12, 12, 3), np.uint8))
    write_image(tmp_path / "images" / "nested" / "c.png", rng.integers(0, 256, (9, 40, 3), np.uint8))
    data = load(tmp_path / "images", resolution=8)

    assert (data.num_channels, data.num_examples, len(data.dataset)) == (3, 3, 3)
    assert data.name == f"image folder {tmp_path / 'images'}"
    for image in data.dataset:
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1


def test_two_colour_image_maps_to_minus_one_and_one(tmp_path):
    pixels = np.zeros((6, 6), np.uint8)
    pixels[:, 3:] = 255
    write_image(tmp_path / "images" / "half.png", pixels)
    image = load(tmp_path / "images", resolution=6).dataset[0]

    expected = torch.full((1, 6, 6), -1.0)
    expected[..., 3:] = 1.0
    assert torch.equal(image, expected)


def test_resize_makes_the_shorter_side_the_resolution(tmp_path):
    write_image(tmp_path / "images" / "wide.png", np.full((16, 32), 100, np.uint8))
    dataset = load(tmp_path / "images", resolution=8).dataset

    assert dataset.images.shape == (1, 1, 8, 16)  # decoded once, aspect ratio kept for random crops
    assert dataset[0].shape == (1, 8, 8) and (as_uint8(dataset[0]) == 100).all()


# --- channels -----------------------------------------------------------------------------------


def test_channels_follow_grayscale_data(tmp_path):
    write_image(tmp_path / "images" / "g.png", np.full((4, 4), 7, np.uint8))
    data = load(tmp_path / "images", resolution=4)
    assert data.num_channels == 1 and data.dataset[0].shape == (1, 4, 4)


def test_mixed_grayscale_and_rgb_become_rgb(tmp_path):
    write_image(tmp_path / "images" / "a_grey.png", np.full((4, 4), 50, np.uint8))
    write_image(tmp_path / "images" / "b_rgb.png", np.full((4, 4, 3), (10, 20, 30), np.uint8))
    data = load(tmp_path / "images", resolution=4)

    assert data.num_channels == 3
    assert (as_uint8(data.dataset[0]) == 50).all()  # grey copied into R, G and B
    assert (as_uint8(data.dataset[1])[:, 0, 0] == (10, 20, 30)).all()


def test_rgb_converted_to_one_channel_with_pil_luminance(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3), np.uint8)
    write_image(tmp_path / "images" / "rgb.png", rgb)
    data = load(tmp_path / "images", resolution=4, num_channels=1)

    assert data.num_channels == 1
    assert (as_uint8(data.dataset[0])[0] == np.array(Image.fromarray(rgb).convert("L"))).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    write_image(tmp_path / "images" / "deep.png", np.array([[0, 257 * 128], [257 * 200, 65535]], np.uint16))
    image = load(tmp_path / "images", resolution=2).dataset[0]
    assert as_uint8(image)[0].tolist() == [[0, 128], [200, 255]]


def test_transparent_pixels_become_white(tmp_path):
    pixels = np.zeros((2, 2, 4), np.uint8)  # black...
    pixels[0, 0, 3] = 255  # ...opaque in one corner, transparent elsewhere
    write_image(tmp_path / "images" / "alpha.png", pixels)
    image = load(tmp_path / "images", resolution=2).dataset[0]

    assert image.shape == (3, 2, 2)
    assert as_uint8(image)[0].tolist() == [[0, 255], [255, 255]]


def test_palette_image_is_rgb(tmp_path):
    palette = Image.fromarray(np.full((4, 4, 3), (200, 30, 60), np.uint8)).quantize(colors=2)
    (tmp_path / "images").mkdir()
    palette.save(tmp_path / "images" / "p.png")
    data = load(tmp_path / "images", resolution=4)
    assert data.num_channels == 3 and (as_uint8(data.dataset[0])[:, 0, 0] == (200, 30, 60)).all()


# --- crops, padding and flips ---------------------------------------------------------------------


def test_center_crop_takes_the_middle(tmp_path):
    write_image(tmp_path / "images" / "ramp.png", column_ramp(8, 12))
    image = load(tmp_path / "images", resolution=8, center_crop=True).dataset[0]
    assert as_uint8(image)[0, 0].tolist() == list(range(2, 10))


def test_small_image_padded_with_black(tmp_path):
    write_image(tmp_path / "images" / "mnist_like.png", np.full((28, 28), 255, np.uint8))
    image = load(tmp_path / "images", resolution=32, pad_to_resolution=True).dataset[0]

    assert image.shape == (1, 32, 32)
    assert (image[:, 2:30, 2:30] == 1).all()  # the 28x28 image, untouched and centered
    assert image.sum() == 28 * 28 - (32 * 32 - 28 * 28)  # everything else is -1


def test_without_padding_small_images_are_upscaled(tmp_path):
    write_image(tmp_path / "images" / "small.png", np.full((28, 28), 255, np.uint8))
    image = load(tmp_path / "images", resolution=32).dataset[0]
    assert (image == 1).all()


def crops_by_epoch(dataset, epochs: int = 20) -> list[list[int]]:
    """The top row of item 0 in each epoch: for a column ramp, which columns were cropped, in which order."""
    rows = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        rows.append(as_uint8(dataset[0])[0, 0].tolist())
    return rows


def test_random_crop_and_flip_depend_only_on_seed_epoch_and_index(tmp_path):
    write_image(tmp_path / "images" / "ramp.png", column_ramp(4, 12))
    dataset = load(tmp_path / "images", resolution=4, random_flip=True, seed=3).dataset

    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1]
    crops = crops_by_epoch(dataset)
    assert torch.equal(torch.get_rng_state(), torch_state)  # augmentation leaves the global RNGs alone
    assert (np.random.get_state()[1] == numpy_state).all()

    assert crops_by_epoch(dataset) == crops  # same (seed, epoch, index): same crop and flip
    for row in crops:  # a contiguous window of the ramp, possibly mirrored
        assert row in (list(range(row[0], row[0] + 4)), list(range(row[0], row[0] - 4, -1)))
    assert len({min(row) for row in crops}) > 3  # the crop moves across epochs...
    assert any(row[0] > row[1] for row in crops) and any(row[0] < row[1] for row in crops)  # ...and flips

    other_seed = load(tmp_path / "images", resolution=4, random_flip=True, seed=4).dataset
    assert crops_by_epoch(other_seed) != crops


def test_set_epoch_reaches_persistent_dataloader_workers(tmp_path):
    write_image(tmp_path / "images" / "ramp.png", column_ramp(4, 64))
    dataset = load(tmp_path / "images", resolution=4).dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, persistent_workers=True)

    for epoch in (0, 1, 2):
        dataset.set_epoch(epoch)
        assert torch.equal(next(iter(loader))[0], dataset[0])


# --- streaming ----------------------------------------------------------------------------------


def grey_level(image: torch.Tensor) -> int:
    return int(as_uint8(image).flat[0])


def test_streaming_shards_partition_the_data(grey_levels):
    config = DataConfig(train_data_dir=str(grey_levels), resolution=4, streaming=True)
    shards = []
    for rank in range(2):
        data = load_train_data(config, process_index=rank, num_processes=2)
        assert (data.num_examples, data.num_channels) == (None, 1)
        shards.append([grey_level(image) for image in data.dataset])

    assert all(shards)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(0, 70, 10))


def test_streaming_resumes_where_it_stopped(tmp_path):
    for i in range(7):
        write_image(tmp_path / "images" / f"{i}.png", column_ramp(4, 6) + 10 * i)
    config = DataConfig(train_data_dir=str(tmp_path / "images"), resolution=4, random_flip=True, streaming=True)

    uninterrupted = load_train_data(config, seed=1).dataset
    uninterrupted.set_epoch(2)
    expected = list(uninterrupted)

    stopped = load_train_data(config, seed=1).dataset
    stopped.set_epoch(2)
    stream = iter(stopped)
    seen = [next(stream) for _ in range(3)]
    state = stopped.state_dict()

    resumed = load_train_data(config, seed=1).dataset  # a fresh process
    resumed.set_epoch(2)
    resumed.load_state_dict(state)
    rest = list(resumed)

    assert len(expected) == 7 and len(rest) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, expected))  # same images, crops and flips

    uninterrupted.set_epoch(3)
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted, expected))  # a new epoch, new augmentation


def test_streaming_max_train_samples_counts_all_ranks(grey_levels):
    config = DataConfig(train_data_dir=str(grey_levels), resolution=4, streaming=True, max_train_samples=4)
    sizes = [len(list(load_train_data(config, process_index=r, num_processes=2).dataset)) for r in range(2)]
    assert sizes == [2, 2]


# --- other sources --------------------------------------------------------------------------------


def test_local_dataset_with_img_column_and_labels(tmp_path):
    """A Hub-style dataset (parquet with `img` and `label`, as cifar10), loaded by path: images arrive as bytes."""
    rows = {"label": [0, 1], "img": [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 255)]}
    features = datasets.Features({"label": datasets.Value("int64"), "img": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "hub" / "data" / "train-0.parquet")
    data = load_train_data(DataConfig(dataset_name=str(tmp_path / "hub"), cache_dir=str(tmp_path / "c"), resolution=4))

    assert (data.name, data.num_examples, data.num_channels) == (str(tmp_path / "hub"), 2, 3)
    assert torch.equal(data.dataset[1], torch.ones(3, 4, 4))


def test_max_train_samples_is_a_seeded_subset(grey_levels):
    def subset(seed: int) -> list[int]:
        return [grey_level(image) for image in load(grey_levels, seed, resolution=4, max_train_samples=3).dataset]

    assert len(subset(0)) == 3 and subset(0) == subset(0) != subset(1)


def test_class_folders_add_a_label_column_that_is_not_the_image(tmp_path):
    for label in ("cat", "dog"):
        write_image(tmp_path / "images" / label / "1.png", np.zeros((4, 4), np.uint8))
    assert load(tmp_path / "images", resolution=4).num_examples == 2  # the image column is still found
    with pytest.raises(ValueError, match=r"--image_column 'label' .* does not hold images.*image \(Image\)"):
        load(tmp_path / "images", image_column="label")


def test_embedded_digits():
    data = load_train_data(DataConfig(resolution=16))
    assert (data.name, data.num_examples, data.num_channels) == (DIGITS_NAME, 1797, 1)

    images = torch.stack([data.dataset[i] for i in range(1797)])
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() == -1 and images.max() == 1
    assert (images[..., :2, :] == -1).all() and (images[..., :, -2:] == -1).all()  # a black margin
    assert images.mean() < -0.5  # thin white strokes on black


def test_digit_images_and_labels():
    images, labels = load_digits_images(resolution=32)
    assert images.shape == (1797, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.tolist()[:10] == list(range(10))
    assert torch.equal(labels.bincount(), torch.tensor([178, 182, 177, 183, 181, 182, 181, 179, 174, 180]))


def test_digits_as_rgb_subset():
    data = load_train_data(DataConfig(resolution=8, num_channels=3, max_train_samples=100))
    assert (data.num_examples, data.num_channels) == (100, 3)
    image = data.dataset[0]
    assert image.shape == (3, 8, 8) and torch.equal(image[0], image[2])


# --- bad input ------------------------------------------------------------------------------------


def test_missing_train_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_train_dir_is_a_file(grey_levels):
    with pytest.raises(NotADirectoryError, match="is a file"):
        load(grey_levels / "00.png")


def test_empty_train_dir(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match="contains no images"):
        load(tmp_path / "images")


def test_image_column_not_found(grey_levels):
    with pytest.raises(ValueError, match=r"--image_column 'picture' not found .* Available columns: image \(Image\)"):
        load(grey_levels, image_column="picture")


def test_corrupted_images_are_counted_and_named(grey_levels):
    (grey_levels / "broken.png").write_bytes(b"not a png")
    (grey_levels / "truncated.png").write_bytes((grey_levels / "30.png").read_bytes()[:40])
    with pytest.raises(ValueError) as error:
        load(grey_levels)
    message = str(error.value)
    assert "2 of 9 images" in message and "broken.png" in message and "truncated.png" in message
    assert "--skip_bad_images to train on the other 7" in message


def test_many_corrupted_images_are_summarised(grey_levels):
    for i in range(7):
        (grey_levels / f"broken{i}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"7 of 14 images .*broken4\.png \(cannot identify image file\) and 2 more\."):
        load(grey_levels)


def test_all_images_corrupted_even_when_skipping(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "only.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="1 of 1 images .* No readable images are left"):
        load(tmp_path / "images", skip_bad_images=True)


def test_skip_bad_images_trains_on_the_rest(grey_levels, caplog):
    (grey_levels / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.data.loading"):
        data = load(grey_levels, resolution=4, skip_bad_images=True)
    assert data.num_examples == 7
    assert "1 of 8 images" in caplog.text and "broken.png" in caplog.text


def test_streaming_bad_image_is_named_or_skipped(grey_levels):
    (grey_levels / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png.*--skip_bad_images"):
        list(load(grey_levels, resolution=4, streaming=True).dataset)
    assert len(list(load(grey_levels, resolution=4, streaming=True, skip_bad_images=True).dataset)) == 7


def test_unloadable_hub_dataset_fails_with_offline_advice(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would
    config = DataConfig(dataset_name="uoft-cs/cifar10", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"Could not load dataset 'uoft-cs/cifar10' .*--train_data_dir"):
        load_train_data(config)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(resolution=0), "--resolution must be a positive"),
        (dict(num_channels=2), "--num_channels must be 1 .* or 3"),
        (dict(max_train_samples=0), "--max_train_samples must be positive"),
        (dict(dataset_name="a/b", train_data_dir="c"), "either --dataset_name or --train_data_dir"),
        (dict(streaming=True), "--streaming needs --dataset_name or --train_data_dir"),
    ],
)
def test_invalid_config(config, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**config)


# --- fuzzing the image folder: every kind of file is converted correctly or reported, never a crash --------------


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: for what PIL cannot write (16-bit RGB) or must not decode (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def fuzzed_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder of every awkward file, with the RGB pixels each readable one must become."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    expected = {}

    def save(name: str, image: Image.Image, pixels: np.ndarray):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
        expected[name] = pixels

    rgb = rng.integers(0, 256, (4, 4, 3), np.uint8)
    save("plain.png", Image.fromarray(rgb), rgb)
    save("ñandú/画像 1.png", Image.fromarray(rgb[::-1]), rgb[::-1])  # a non-ASCII path with a space
    cmyk = Image.fromarray(rgb).convert("CMYK")
    save("cmyk.jpg", cmyk, np.asarray(cmyk.convert("RGB")))  # what JPEG keeps is checked below, after decoding
    palette = Image.fromarray(rgb).quantize(colors=4)
    save("palette.png", palette, np.asarray(palette.convert("RGB")))
    rgba = np.dstack([rgb, np.full((4, 4), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel: white
    save("alpha.png", Image.fromarray(rgba, "RGBA"), np.where(rgba[..., 3:] == 0, 255, rgb).astype(np.uint8))
    save("one_pixel.png", Image.fromarray(np.full((1, 1, 3), (9, 99, 199), np.uint8)),
         np.full((4, 4, 3), (9, 99, 199), np.uint8))
    deep = np.array([[[65535, 32896, 0]] * 4] * 4, ">u2")  # 16-bit RGB: PIL keeps the high bytes
    (folder / "deep_rgb16.png").write_bytes(png_bytes(4, 4, 16, 2, b"".join(b"\0" + row.tobytes() for row in deep)))
    expected["deep_rgb16.png"] = np.full((4, 4, 3), (255, 128, 0), np.uint8)
    grey16 = np.full((4, 4), 257 * 100, np.uint16)
    save("grey16.png", Image.fromarray(grey16), np.full((4, 4, 3), 100, np.uint8))

    (folder / "truncated.png").write_bytes((folder / "plain.png").read_bytes()[:60])
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "text.png").write_text("not a picture, whatever the name says")
    (folder / "bomb.png").write_bytes(png_bytes(30000, 30000, 8, 0, b"\0" * 100))  # 900M pixels, 150 bytes
    (folder / "notes.txt").write_text("not an image, and not named like one: ignored")
    return folder, expected


BAD_FILES = ("truncated.png", "zero_bytes.png", "text.png", "bomb.png")


def test_every_unreadable_file_is_named_with_its_reason(fuzzed_folder):
    folder, expected = fuzzed_folder
    with pytest.raises(ValueError) as error:
        load(folder, resolution=4, num_channels=3)
    message = str(error.value)
    assert "\n" not in message and f"4 of {len(expected) + 4} images" in message
    assert all(f"{name} (" in message for name in BAD_FILES)  # each named, with PIL's reason:
    assert "truncated" in message and "decompression bomb" in message and message.count("cannot identify") == 2
    assert "--skip_bad_images" in message and not any(name in message for name in expected)


def test_skip_bad_images_converts_the_rest_exactly_and_counts_the_skipped(fuzzed_folder, caplog):
    folder, expected = fuzzed_folder
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.data.loading"):
        data = load(folder, resolution=4, num_channels=3, skip_bad_images=True)
    assert (data.num_examples, data.skipped_images, data.num_channels) == (len(expected), 4, 3)
    assert f"4 of {len(expected) + 4} images" in caplog.text

    files = sorted(expected, key=lambda name: str(folder / name))  # imagefolder's order
    for name, image in zip(files, data.dataset):
        pixels = as_uint8(image).transpose(1, 2, 0)
        tolerance = 40 if name.endswith(".jpg") else 0  # JPEG's loss; the colours must still be the CMYK's
        assert np.abs(pixels.astype(int) - expected[name]).max() <= tolerance, name
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=len(expected), num_workers=1)
    assert next(iter(loader)).shape == (len(expected), 3, 4, 4)  # nothing left to fail in a worker
