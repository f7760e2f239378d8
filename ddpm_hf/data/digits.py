"""The embedded default dataset: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled.

It ships inside scikit-learn, so `python examples/train.py` trains on real images with no network,
and at 16 px a small UNet learns recognisable digits on a CPU in minutes.
"""

import torch
import torch.nn.functional as F

DIGITS_NAME = "sklearn digits (embedded)"

# Share of the side the digit occupies; the rest is a black margin, as MNIST puts 20 px digits in 28 px
# images. The 8x8 scans touch their borders, and digits that touch the image edge are hard to read.
_DIGIT_SCALE = 0.75


def load_digits_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as white-on-black grayscale images, and their labels.

    Each 8x8 scan (values 0..16) is resized with bicubic interpolation to `0.75 * resolution` and
    centered on a black `resolution x resolution` canvas.

    Args:
        resolution (`int`): Side of the square output images.

    Returns:
        `(images, labels)`: uint8 images of shape `(1797, 1, resolution, resolution)` in [0, 255], and
        int64 labels of shape `(1797,)` in 0..9.

    Example:

    ```py
    >>> images, labels = load_digits_images(16)
    >>> images.shape, labels[:5].tolist()
    (torch.Size([1797, 1, 16, 16]), [0, 1, 2, 3, 4])
    ```
    """
    try:
        from sklearn.datasets import load_digits  # optional dependency: ddpm_hf[train]
    except ImportError as err:
        raise ImportError(
            "The embedded digits dataset needs scikit-learn: `pip install scikit-learn` (or `ddpm_hf[train]`), "
            "or pass --dataset_name / --train_data_dir."
        ) from err

    digits = load_digits()
    scans = torch.from_numpy(digits.images).float().unsqueeze(1) / 16  # (N, 1, 8, 8) in [0, 1]
    size = max(1, round(resolution * _DIGIT_SCALE))
    # Bicubic overshoots a little around strokes; clamp back into [0, 1].
    glyphs = F.interpolate(scans, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    glyphs = glyphs.clamp(0, 1)
    before = (resolution - size) // 2
    images = F.pad(glyphs, (before, resolution - size - before) * 2)  # (N, 1, resolution, resolution)
    return (images * 255).round().to(torch.uint8), torch.from_numpy(digits.target).long()
