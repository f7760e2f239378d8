"""The real-data floor: the distance that real images, not seen by the reference, score at the samples' count.

No model can be expected to beat real data, and the Fréchet distance of N images to a reference is
biased upwards by a term that shrinks with N, so a model's distance means something only beside the
floor at the same N. The floor's standard deviation says how much two measurements of N images can
differ by chance: `ddpm-hf sweep` treats samplers within it of the best as equally good.

- The floor is the Fréchet distance of N held-out real images (the digits' "test" split, a Hub
  dataset's "test" split, ...; a fixed random subset of N when there are more) to the reference.
- Its standard deviation is measured over several held-out real subsets: `num_partitions` random
  partitions of all the real images (the reference's and the held-out ones) into N held-out images
  and a reference of the rest, each scored like the floor. The digits have only 360 held-out images,
  so independent held-out sets of 360 do not exist; the partitions draw every subset from the whole
  pool instead. Each partition's reference also varies, which adds a little to the spread.

Measured on the README main job's model of 2026-11-30 (plain MSE; 360 samples, digits features): 20 disjoint
seed sets of samples (SDE-DPM-Solver++, 20 steps) have a Fréchet distance of 7.34 ± 1.44. The partitions give the
real digits' floor 4.45 ± 1.63 (2,000 partitions; ± 1.76 with the default 100). A bootstrap of the
held-out images (resampled with replacement) would say ± 2.27, and ± 2.33 on average for one set of
samples, where the truth is ± 1.44: the duplicates it draws add spread of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .features import FeatureExtractor
from .metrics import FeatureStats, frechet_distance
from .reference import DIGITS, ReferenceStats, reference_stats

if TYPE_CHECKING:
    from .evaluate import EvaluationResult


@dataclass
class RealDataFloor:
    """The Fréchet distance of held-out real images to the reference, and its standard deviation."""

    frechet_distance: float
    std: float  # standard deviation over random partitions of the real images (see the module's docstring)
    num_images: int  # N, the held-out images measured (the samples' count, or all there are if fewer)
    num_partitions: int
    description: str  # which images, e.g. "digits, split test, 16 px"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def real_data_floor(held_out: ReferenceStats, reference: ReferenceStats, num_partitions: int = 100,
                    seed: int = 0) -> RealDataFloor:
    """The floor of the Fréchet distance to `reference`, from the features of held-out real images.

    Args:
        held_out ([`ReferenceStats`]): Statistics of the held-out images (from [`reference_stats`] with the
            held-out split and `max_images` = the number of samples), with their features.
        reference ([`ReferenceStats`]): The reference the samples are compared with. Its kept features (all of
            them up to 10,000 images) join the pool that the partitions split.
        num_partitions (`int`): Random partitions for the standard deviation.
        seed (`int`): Seeds the partitions.
    """
    floor, real = held_out.stats, reference.stats
    pool = np.concatenate([real.features, floor.features]).astype(np.float64)
    count = len(floor.features)
    rng = np.random.default_rng(seed)
    distances = []
    for _ in range(num_partitions):
        order = rng.permutation(len(pool))
        subset, rest = FeatureStats.from_features(pool[order[:count]]), FeatureStats.from_features(pool[order[count:]])
        distances.append(frechet_distance(subset.mu, subset.sigma, rest.mu, rest.sigma))
    return RealDataFloor(
        frechet_distance=frechet_distance(floor.mu, floor.sigma, real.mu, real.sigma),
        std=float(np.std(distances, ddof=1)),
        num_images=floor.num_images,
        num_partitions=num_partitions,
        description=held_out.description,
    )


def prepare_floor(
    extractor: FeatureExtractor,
    reference_set: ReferenceStats,
    floor_split: str,
    num_samples: int,
    *,
    reference: str = DIGITS,
    split: str = "train",
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 256,
    **unused: Any,  # the other arguments of `prepare_reference`, which the floor shares
) -> RealDataFloor:
    """The floor of `num_samples` images of the reference's held-out `floor_split` (all of it if it has fewer),
    with their features cached like the reference's.

    Raises:
        ValueError: if the held-out split overlaps the reference's split, or cannot be loaded.
    """
    if floor_split == split or (reference == DIGITS and "all" in (split, floor_split)):
        raise ValueError(f"The real-data floor needs images that the reference does not hold, but the held-out split "
                         f"{floor_split!r} overlaps the reference's split {split!r}: name another held-out split "
                         "(--floor-split), or give --tolerance and --floor-split none.")
    try:
        held_out = reference_stats(extractor, reference, floor_split, reference_set.resolution,
                                   dataset_config_name=dataset_config_name, image_column=image_column,
                                   max_images=num_samples, cache_dir=cache_dir, batch_size=batch_size)
    except ValueError as error:
        raise ValueError(f"The real-data floor needs held-out images of the reference: {error} Name a held-out split "
                         "with --floor-split, or give --tolerance and --floor-split none.") from error
    return real_data_floor(held_out, reference_set)


def default_floor_split(reference: str, split: str = "train") -> str | None:
    """The held-out split that evaluation scores beside the samples by default: the digits' "test" (cheap and always
    there) when the reference is their "train" split; none otherwise (`ddpm-hf sweep --floor-split` names one)."""
    return "test" if reference == DIGITS and split == "train" else None


def format_quality(result: EvaluationResult) -> str:
    """The distance beside its floor, e.g. "FD_digits 5.10 (real digits: 4.45 ± 1.58)"."""
    name = "FD_digits" if result.features.startswith("digits") else "FID"
    text = f"{name} {result.frechet_distance:.2f}"
    if result.floor is not None:
        real = "real digits" if result.floor.description.startswith(DIGITS) else "real images"
        text += f" ({real}: {result.floor.frechet_distance:.2f} ± {result.floor.std:.2f})"
    return text
