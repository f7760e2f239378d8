"""Training DDPMs with Accelerate: `train(TrainingConfig(...))`, or `python examples/train.py` on the command line."""

from .checkpointing import CorruptCheckpointError
from .checks import LaunchError
from .config import TrainingConfig, build_parser, parse_args
from ..data import DataConfig, TrainData, load_train_data
from .loop import train
from .durable_io import WriteFailedError
from .monitoring import NonFiniteLossError
from .presets import UNET_PRESETS, load_unet_config
from .run_lock import OutputDirLockedError

__all__ = [
    "CorruptCheckpointError",
    "DataConfig",
    "LaunchError",
    "NonFiniteLossError",
    "OutputDirLockedError",
    "TrainData",
    "TrainingConfig",
    "UNET_PRESETS",
    "build_parser",
    "load_train_data",
    "load_unet_config",
    "parse_args",
    "train",
    "WriteFailedError",
]
