"""Training-image preprocessing with PIL, NumPy and torch (no torchvision).

Two halves, so that the costly one runs once:

1. [`prepare_image`] (load time, deterministic): decode, convert to 8-bit grayscale or RGB, resize
   the shorter side to `resolution` (or pad small images up to it), optionally center crop.
   Result: a uint8 `(C, H, W)` tensor with `min(H, W) == resolution`.
2. [`RandomCropFlip`] + [`to_model_range`] (every epoch): random crop to `resolution x resolution`,
   optional horizontal flip, scaling from [0, 255] to [-1, 1].
"""

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# What PIL raises for a file that is not an image, or a truncated or corrupted one.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def open_image(value: dict) -> Image.Image:
    """Fully decode a `datasets` image value stored undecoded (`{"bytes": ..., "path": ...}`).

    Raises one of `BAD_IMAGE_ERRORS` when the data is not a readable image.
    """
    image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    image.load()  # Image.open only reads the header; truncated pixel data fails here.
    return image


def image_channels(image: Image.Image) -> int:
    """1 for grayscale modes (with or without alpha, any bit depth), 3 for everything else."""
    return 1 if image.mode in _GRAYSCALE_MODES else 3


def to_8bit(image: Image.Image, num_channels: int) -> Image.Image:
    """Convert any PIL image to 8-bit `"L"` (`num_channels=1`) or `"RGB"` (`num_channels=3`).

    Camera rotation (EXIF) is applied, 16-bit grayscale is scaled (PIL's own conversion would clip it to
    white), and transparent pixels are composited onto white rather than exposing whatever colour is
    stored under alpha 0.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("L" if num_channels == 1 else "RGB")


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize keeping the aspect ratio so that the shorter side is `resolution` (bilinear, as diffusers' example)."""
    width, height = image.size
    scale = resolution / min(width, height)
    if scale == 1:
        return image
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    # PIL widens the filter support when downscaling, so this is antialiased.
    return image.resize(size, Image.Resampling.BILINEAR)


def pad_to_size(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """Zero-pad (black) a `(C, H, W)` tensor symmetrically so that H and W are at least `resolution`."""
    pad_h = max(resolution - pixels.shape[-2], 0)
    pad_w = max(resolution - pixels.shape[-1], 0)
    # Odd padding puts the extra pixel at the bottom/right.
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return torch.nn.functional.pad(pixels, padding) if any(padding) else pixels


def crop(pixels: torch.Tensor, top: int, left: int, resolution: int) -> torch.Tensor:
    """The `resolution x resolution` window of a `(C, H, W)` tensor starting at `(top, left)`."""
    return pixels[:, top : top + resolution, left : left + resolution]


def crop_center(pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """The central `resolution x resolution` window (an odd margin leaves the extra pixel bottom/right)."""
    height, width = pixels.shape[-2:]
    return crop(pixels, (height - resolution) // 2, (width - resolution) // 2, resolution)


def prepare_image(
    image: Image.Image,
    num_channels: int,
    resolution: int,
    *,
    center_crop: bool = False,
    pad_to_resolution: bool = False,
) -> torch.Tensor:
    """Load-time preprocessing: a PIL image to a uint8 tensor ready for [`RandomCropFlip`].

    Args:
        image (`PIL.Image.Image`): Any mode (L, RGB, RGBA, P, 16-bit, ...).
        num_channels (`int`): 1 (grayscale) or 3 (RGB).
        resolution (`int`): Side of the square training crop.
        center_crop (`bool`): Crop the center now, instead of a random window every epoch.
        pad_to_resolution (`bool`): Pad an image whose shorter side is below `resolution` with black
            instead of upscaling it (MNIST 28 -> 32). Larger images are still resized down.

    Returns:
        `torch.Tensor` of dtype uint8 and shape `(C, H, W)` with `min(H, W) == resolution`, or exactly
        `(C, resolution, resolution)` when `center_crop`.
    """
    image = to_8bit(image, num_channels)
    if not (pad_to_resolution and min(image.size) < resolution):
        image = resize_shorter_side(image, resolution)
    pixels = torch.from_numpy(np.array(image)).reshape(image.height, image.width, num_channels)
    pixels = pad_to_size(pixels.permute(2, 0, 1), resolution)  # (C, H, W)
    if center_crop:
        pixels = crop_center(pixels, resolution)
    return pixels.contiguous()


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 255] to float32 in [-1, 1], the range the DDPM forward process assumes."""
    return pixels.float() / 127.5 - 1


@dataclass(frozen=True)
class RandomCropFlip:
    """Random `resolution x resolution` crop and optional horizontal flip, reproducible from an integer key.

    Each call seeds its own NumPy generator from `(seed, *key)`, e.g. `(seed, epoch, index)`, so a resumed
    run sees exactly the crops and flips of an uninterrupted one, and the global RNGs used for noise and
    timesteps are never consumed.

    Args:
        resolution (`int`): Side of the square crop.
        random_flip (`bool`): Mirror left-right with probability 1/2.
        seed (`int`): Base seed (non-negative).
    """

    resolution: int
    random_flip: bool = False
    seed: int = 0

    def __call__(self, pixels: torch.Tensor, *key: int) -> torch.Tensor:  # (C, H, W) -> (C, res, res)
        rng = np.random.default_rng((self.seed, *key))
        height, width = pixels.shape[-2:]
        top = int(rng.integers(height - self.resolution + 1))
        left = int(rng.integers(width - self.resolution + 1))
        pixels = crop(pixels, top, left, self.resolution)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return pixels
