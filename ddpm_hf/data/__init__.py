"""Images for training and evaluation: a Hub dataset, a local image folder or the embedded digits.

`load_train_data(DataConfig(...))` gives a torch dataset of `[-1, 1]` image tensors; evaluation prepares
its reference images with the same preprocessing, so the samples and the reference are compared alike.
"""

from .digits import DIGITS_NAME, load_digits_images
from .loading import DataConfig, TrainData, load_train_data

__all__ = ["DIGITS_NAME", "DataConfig", "TrainData", "load_digits_images", "load_train_data"]
