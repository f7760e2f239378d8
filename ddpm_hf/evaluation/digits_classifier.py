"""A small CNN that reads the embedded 16 px digits: the offline feature extractor for Fréchet distance.

Its weights ship with the package (`digits_classifier.safetensors`, 150 kB), so that a distance
computed on one machine equals the one computed on another: a classifier retrained on first use
would differ in its last bits across CPUs and BLAS builds, and so would every distance measured
with it. The file was made by the recipe below; regenerate it with

    python -m ddpm_hf.evaluation.digits_classifier

It trains on the digits' "train" split only (see [`digits_split`]); the held-out "test" split
measures its accuracy and serves as the real-data floor of the Fréchet distance.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.digits import load_digits_images

WEIGHTS_FILE = Path(__file__).with_name("digits_classifier.safetensors")
RESOLUTION = 16  # the classifier's input side; other resolutions are resized to it
DIGITS_SPLITS = ("train", "test", "all")
_NUM_TEST = 360  # one fifth of the 1,797 digits, chosen by a fixed permutation
_SPLIT_SEED = 0


class DigitsClassifier(nn.Module):
    """Two conv blocks, a 64-d feature layer (the embedding used for distances) and 10 logits."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 8, 8)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Flatten(), nn.Linear(32 * 4 * 4, self.feature_dim), nn.ReLU(),  # (B, 64)
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 1, 16, 16)` images in [0, 1] -> features `(B, 64)` and logits `(B, 10)`."""
        features = self.features(images * 2 - 1)
        return features, self.head(features)


def digits_split(split: str, resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits of one split, as uint8 images `(N, 1, resolution, resolution)` and int64 labels.

    Args:
        split (`str`): "train" (1,437 digits), "test" (the other 360) or "all" (1,797). The split is a
            fixed random permutation, the same on every machine.
        resolution (`int`): Side of the images (see [`load_digits_images`]).
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"The embedded digits have splits {', '.join(DIGITS_SPLITS)}; got {split!r}.")
    images, labels = load_digits_images(resolution)
    if split == "all":
        return images, labels
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    chosen = np.sort(order[-_NUM_TEST:] if split == "test" else order[:-_NUM_TEST])
    return images[chosen], labels[chosen]


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Float `(B, 1, H, W)` images in [0, 1] at any size -> `(B, 1, 16, 16)` (bilinear, antialiased)."""
    if images.shape[1] != 1:
        raise ValueError(
            f"The digits classifier reads grayscale images (1 channel); got {images.shape[1]} channels. "
            "Use the Inception features for RGB images."
        )
    if images.shape[-2:] == (RESOLUTION, RESOLUTION):
        return images
    return F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)


def shift_randomly(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in each direction, filling with black."""
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    size = images.shape[-1]
    return torch.stack([image[:, top : top + size, left : left + size] for image, (top, left) in zip(padded, offsets)])


def train_digits_classifier(epochs: int = 30, batch_size: int = 64, seed: int = 0) -> DigitsClassifier:
    """Train [`DigitsClassifier`] on the "train" split with Adam and random 1-pixel shifts (a few seconds on a CPU)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    images, labels = digits_split("train")
    images = images.float() / 255
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(images) // batch_size))
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            _, logits = model(shift_randomly(images[batch], generator))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, split: str = "test") -> float:
    """The share of a digits split that `model` labels correctly."""
    images, labels = digits_split(split)
    _, logits = model(images.float() / 255)
    return (logits.argmax(dim=1) == labels).float().mean().item()


def load_digits_classifier(path: str | Path = WEIGHTS_FILE) -> DigitsClassifier:
    """The classifier with the weights shipped in the package (or those in `path`), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Digits classifier weights not found at {path}. Reinstall ddpm_hf, or regenerate them with "
            "`python -m ddpm_hf.evaluation.digits_classifier`."
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def weights_fingerprint(path: str | Path = WEIGHTS_FILE) -> str:
    """The first 8 hex digits of the weights file's SHA-256: part of every cache key computed with it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


if __name__ == "__main__":
    classifier = train_digits_classifier()
    save_file({name: tensor.contiguous() for name, tensor in classifier.state_dict().items()}, WEIGHTS_FILE)
    print(f"Wrote {WEIGHTS_FILE} ({weights_fingerprint()}): test accuracy {classifier_accuracy(classifier):.4f}")
