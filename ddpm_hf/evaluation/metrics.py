"""Distances between two sets of image features: Fréchet distance, KID, precision and recall.

Every function takes features as float arrays of shape `(N, D)`, one row per image, computed by a
feature extractor (see `features.py`); the Fréchet distance takes their means and covariances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# KID and precision/recall compare individual features, so the statistics keep a random subset of
# them; 10,000 is what torch-fidelity's KID draws from at most.
MAX_KEPT_FEATURES = 10_000


@dataclass
class FeatureStats:
    """What the metrics need to know about one image set: feature mean, covariance and a sample of features."""

    mu: np.ndarray  # (D,) float64 mean
    sigma: np.ndarray  # (D, D) float64 covariance (unbiased, N - 1)
    features: np.ndarray  # (min(N, MAX_KEPT_FEATURES), D) float32, for KID and precision/recall
    num_images: int  # N, the number of images the mean and covariance come from

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor, seed: int = 0) -> "FeatureStats":
        """Statistics of `(N, D)` features; N > 1."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Need features of shape (N, D) with N >= 2, got {features.shape}.")
        kept = features
        if len(features) > MAX_KEPT_FEATURES:
            kept = features[np.random.default_rng(seed).choice(len(features), MAX_KEPT_FEATURES, replace=False)]
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), kept.astype(np.float32), len(features))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau, 1982).

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    FID (Heusel et al., 2017) is this distance between Inception features. The trace of the matrix square root
    is computed as the sum of the square roots of the eigenvalues of the symmetric matrix
    `sigma1^(1/2) sigma2 sigma1^(1/2)` (which has the same eigenvalues as `sigma1 sigma2`): exact for
    positive semi-definite covariances, real by construction, and stable for singular ones, where
    `scipy.linalg.sqrtm` needs an epsilon and a check on imaginary parts.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Mismatched statistics: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {sigma1.shape} and {sigma2.shape}.")
    root1 = _sqrt_psd(sigma1)
    eigenvalues = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt_product = np.sqrt(eigenvalues.clip(min=0)).sum()
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative rounding errors clipped to 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def kernel_inception_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018): the unbiased estimate of MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3.

    Averaged over `num_subsets` random subsets of `min(subset_size, N1, N2)` features from each set, as
    torch-fidelity and clean-fid compute it. Unbiased, so it is ~0 (and can be slightly negative) for two
    samples of one distribution, whatever their size.

    Returns:
        `(mean, std)` over the subsets.
    """
    features1, features2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    dim = features1.shape[1]
    m = min(subset_size, len(features1), len(features2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(features1)} and {len(features2)}.")
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = features1[rng.choice(len(features1), m, replace=False)]
        y = features2[rng.choice(len(features2), m, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        # Unbiased: the diagonals k(x_i, x_i) are left out of the within-set means.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2 * k_xy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-nearest-neighbour balls.

    Precision: the share of generated features inside some real feature's ball (reaching its k-th nearest
    real neighbour): how many samples look real. Recall: the same with the roles swapped: how much of the
    real data the samples cover.
    """
    real_t, generated_t = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(generated, dtype=torch.float32)
    return _share_inside_balls(real_t, generated_t, k), _share_inside_balls(generated_t, real_t, k)


def _share_inside_balls(manifold: torch.Tensor, queries: torch.Tensor, k: int) -> float:
    """The share of `queries` within the k-NN radius of at least one point of `manifold`."""
    # The k+1-th smallest distance from each point to its own set: the 1st is the point itself.
    radii = torch.cdist(manifold, manifold).kthvalue(k + 1, dim=1).values  # (M,)
    inside = torch.zeros(len(queries), dtype=torch.bool)
    for start in range(0, len(queries), 1024):  # bounded memory: (1024, M) distances at a time
        distances = torch.cdist(queries[start : start + 1024], manifold)
        inside[start : start + 1024] = (distances <= radii).any(dim=1)
    return inside.float().mean().item()
