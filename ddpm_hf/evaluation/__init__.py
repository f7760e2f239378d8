"""Sample quality: Fréchet distance (FID), KID, precision/recall and digit-classifier scores against a reference set.

```py
>>> from ddpm_hf.evaluation import evaluate_pipeline, sweep_samplers
>>> result = evaluate_pipeline(pipe, num_samples=360)  # vs the embedded digits, with the shipped digits classifier
>>> result.frechet_distance, result.confidence, result.class_coverage
>>> sweep = sweep_samplers(pipe)  # every (sampler, steps) pair; sweep.recommendation is the fastest of full quality
```
"""

from .digits_classifier import DigitsClassifier, digits_split, load_digits_classifier
from .evaluate import (
    EvaluationResult,
    evaluate_images,
    evaluate_pipeline,
    generate_images,
    prepare_evaluation,
    prepare_reference,
    prepare_scoring,
)
from .floor import RealDataFloor, default_floor_split, format_quality, prepare_floor, real_data_floor
from .features import (
    INCEPTION_WEIGHTS_ENV,
    DigitsFeatures,
    FeatureExtractor,
    InceptionFeatures,
    compute_features,
    get_feature_extractor,
)
from .metrics import FeatureStats, frechet_distance, kernel_inception_distance, precision_recall
from .reference import ReferenceStats, load_reference_images, reference_for_training, reference_stats
from .sweep import SamplerSweep, SweepPoint, sweep_samplers

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "DigitsClassifier",
    "DigitsFeatures",
    "EvaluationResult",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatures",
    "RealDataFloor",
    "ReferenceStats",
    "SamplerSweep",
    "SweepPoint",
    "compute_features",
    "default_floor_split",
    "digits_split",
    "evaluate_images",
    "evaluate_pipeline",
    "format_quality",
    "frechet_distance",
    "generate_images",
    "get_feature_extractor",
    "kernel_inception_distance",
    "load_digits_classifier",
    "load_reference_images",
    "precision_recall",
    "prepare_evaluation",
    "prepare_floor",
    "prepare_reference",
    "prepare_scoring",
    "real_data_floor",
    "reference_for_training",
    "reference_stats",
    "sweep_samplers",
]
