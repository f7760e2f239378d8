"""Feature extractors: images in, one feature vector per image out. The metrics compare these vectors.

Two are built in, chosen by name with [`get_feature_extractor`]:

- `"digits"`: the penultimate layer (64-d) of a small classifier trained in this project on the
  embedded digits, whose weights ship with the package. Offline, fast, and meaningful for grayscale
  digits only; it also reports how confidently and how evenly the samples read as digits.
- `"inception"`: the 2048-d pool features of the TensorFlow Inception-v3 that FID is defined with
  (Heusel et al., 2017), as pytorch-fid and torch-fidelity compute them. ddpm_hf never downloads it:
  pass the path of the TorchScript file `inception-2015-12-05.pt` (NVIDIA's export, used by
  StyleGAN2-ADA, StyleGAN3 and clean-fid) as `inception_weights=` / `--inception-weights`, or set
  the environment variable `DDPM_HF_INCEPTION_WEIGHTS`.

Any object with the attributes and `__call__` of [`FeatureExtractor`] can be passed instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .digits_classifier import WEIGHTS_FILE, load_digits_classifier, to_classifier_input, weights_fingerprint

INCEPTION_WEIGHTS_ENV = "DDPM_HF_INCEPTION_WEIGHTS"
FEATURE_EXTRACTORS = ("digits", "inception")


class FeatureExtractor:
    """What the metrics need from a feature extractor.

    Attributes:
        name (`str`): Identifies the extractor and its weights; part of the reference statistics' cache key.
        feature_dim (`int`): D, the length of each feature vector.
        min_samples (`int`): Below this many images per set the Fréchet distance is too noisy to compare,
            and evaluation warns.
    """

    name: str
    feature_dim: int
    min_samples: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Float `(B, C, H, W)` images in [0, 1] -> `(B, feature_dim)` features."""
        raise NotImplementedError


class DigitsFeatures(FeatureExtractor):
    """The 64-d penultimate layer (post-ReLU) of the shipped digits classifier (see `digits_classifier.py`).

    The Fréchet distance falls as the number of images grows: the 360 held-out digits against the 1,437
    training digits measure 4.5, random subsets of 256 of them 5.8 ± 1.3, of 128 11.4 ± 3.1, of 64 19.6 ± 8.1
    (noise images: 545). So compare numbers computed from the same number of images, and use at least 256.
    The features are not rescaled, so KID values are large (x.y / D is about 34 for digits, where Inception
    features give well below 1); compare them with each other only.
    """

    feature_dim = 64
    min_samples = 256

    def __init__(self, device: str | torch.device = "cpu"):
        self.classifier = load_digits_classifier().to(device)
        self.device = torch.device(device)
        self.name = f"digits-classifier-{weights_fingerprint(WEIGHTS_FILE)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features, _ = self.classifier(to_classifier_input(images.to(self.device)))
        return features

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Float `(B, 1, H, W)` images in [0, 1] -> `(B, 10)` softmax probabilities of the digits 0..9."""
        _, logits = self.classifier(to_classifier_input(images.to(self.device)))
        return logits.softmax(dim=1)


class InceptionFeatures(FeatureExtractor):
    """FID's Inception-v3 pool features, from NVIDIA's TorchScript export of the TensorFlow graph.

    Grayscale images are repeated to three channels; the network resizes to 299 x 299 itself. Images are
    passed as [0, 255] values, as StyleGAN's and clean-fid's metric code pass them.

    Args:
        weights_path (`str` or `os.PathLike`, *optional*): The `inception-2015-12-05.pt` file. Defaults to
            the `DDPM_HF_INCEPTION_WEIGHTS` environment variable.
        device: Where to run the network.

    Raises:
        FileNotFoundError: if no path is given or the file does not exist. Nothing is downloaded.
    """

    feature_dim = 2048
    min_samples = 2048  # pytorch-fid's advice: at least as many images as dimensions, or the covariance is singular

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        weights_path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not weights_path:
            raise FileNotFoundError(
                "The Inception features need the TorchScript file inception-2015-12-05.pt (the FID network of "
                "StyleGAN2-ADA and clean-fid), which ddpm_hf does not download: pass its path with "
                f"--inception-weights PATH (inception_weights=PATH in Python) or set {INCEPTION_WEIGHTS_ENV}. "
                "Offline, use --features digits for digit images."
            )
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {path} (from --inception-weights or {INCEPTION_WEIGHTS_ENV}): "
                "expected the TorchScript file inception-2015-12-05.pt. ddpm_hf does not download it."
            )
        self.device = torch.device(device)
        self.network = torch.jit.load(str(path), map_location=self.device).eval()
        self.name = f"inception-{_file_fingerprint(path)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.network(images * 255, return_features=True).reshape(len(images), -1)


def get_feature_extractor(
    features: str | FeatureExtractor,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """The extractor named `features` ("digits" or "inception"), or `features` itself if it already is one."""
    if not isinstance(features, str):
        return features
    if features == "digits":
        return DigitsFeatures(device)
    if features == "inception":
        return InceptionFeatures(inception_weights, device)
    raise ValueError(f"Unknown features {features!r}: choose one of {', '.join(FEATURE_EXTRACTORS)}.")


def compute_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 `(N, C, H, W)` images -> float `(N, D)` features on the CPU, `batch_size` images at a time."""
    batches = [extractor(batch.float() / 255).float().cpu() for batch in images.split(batch_size)]
    return torch.cat(batches)


def _file_fingerprint(path: Path) -> str:
    """The first 8 hex digits of a file's SHA-256 (about 0.3 s for the 100 MB Inception file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:8]
