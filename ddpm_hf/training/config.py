"""`TrainingConfig`: every training default in one typed dataclass, and the CLI flags generated from it.

Each field becomes a `--flag` of the same name: its type gives the argparse type, a `Literal` gives
the choices, a `bool` gives `--flag` / `--no-flag`, and the comment beside the field is its help text.
The data fields come from [`DataConfig`] and take the same flag names (`--resolution`, ...).
"""

from __future__ import annotations

import argparse
import inspect
import io
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from ..schedulers.samplers import EVAL_SAMPLER, EVAL_STEPS, SamplerName
from ..schedulers.scheduling_ddpm import BetaSchedule, PredictionType
from ..data import DataConfig

LRScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
MixedPrecision = Literal["no", "fp16", "bf16"]
Logger = Literal["tensorboard", "wandb", "none"]
HubStrategy = Literal["end", "checkpoint"]

# Fields never written to disk, logged or printed.
SECRET_FIELDS = ("hub_token",)


@dataclass
class TrainingConfig:
    """How to train: model, diffusion, optimisation, checkpoints and outputs. Field names are the CLI flags."""

    data: DataConfig = field(default_factory=DataConfig)  # the images: source and preprocessing

    # Model and diffusion
    model_config: str = "tiny"  # a preset (tiny, micro, ddpm-cifar10, diffusers-example) or a UNet config.json
    ddpm_num_steps: int = 1000  # T, the number of noising steps (Ho et al. 2020 use 1000)
    ddpm_beta_schedule: BetaSchedule = "linear"  # how beta_t grows; "linear" is the paper's 1e-4 -> 0.02
    prediction_type: PredictionType = "epsilon"  # the UNet's target: the noise (the paper), x_0, or v
    snr_gamma: float | None = None  # min-SNR-gamma loss weights (Hang et al. 2023 use 5.0); None: plain MSE

    # Optimisation
    seed: int = 0  # seeds the weights, the data order and every training step's noise
    train_batch_size: int = 64  # images per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (global batch = this x batch x processes)
    max_train_steps: int = 1000  # optimizer steps to train for (ignored when --num_epochs is given)
    num_epochs: int | None = None  # train for whole passes over the data instead of --max_train_steps
    learning_rate: float = 2e-3  # peak AdamW learning rate; small models on small images take large ones
    lr_scheduler: LRScheduler = "cosine"  # the learning-rate shape after warmup (diffusers.optimization)
    lr_warmup_steps: int = 100  # optimizer steps of linear warmup from 0, which steadies Adam's first updates
    adam_beta1: float = 0.9  # AdamW's first-moment decay
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    adam_weight_decay: float = 0.0  # decoupled weight decay; the DDPM paper uses none
    adam_epsilon: float = 1e-8  # AdamW's denominator floor
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (the DDPM paper clips at 1)
    use_ema: bool = True  # keep an exponential moving average of the weights; the saved pipeline holds it
    ema_max_decay: float = 0.999  # the EMA's final decay; 0.9999 suits runs of 100k+ steps
    ema_inv_gamma: float = 1.0  # EMA warmup: decay = 1 - (1 + step / inv_gamma) ** -power
    ema_power: float = 0.75  # EMA warmup power; 3/4 reaches decay 0.999 after 10k steps, 2/3 suits longer runs
    mixed_precision: MixedPrecision | None = None  # autocast dtype; None: as `accelerate config` says, else "no"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs: faster, ~1e-3 relative error
    channels_last: bool = False  # NHWC memory layout, faster convolutions with mixed precision on recent GPUs
    torch_compile: bool = False  # torch.compile the UNet; falls back to eager with a warning where it fails
    dataloader_num_workers: int = 0  # DataLoader worker processes; streaming needs 0 (its position is checkpointed)

    # Checkpoints, logs and outputs
    output_dir: str = "outputs/ddpm-digits"  # the pipeline, checkpoints/, samples/ and logs/ go here
    overwrite_output_dir: bool = False  # allow writing into a non-empty output_dir (files there may be replaced)
    checkpointing_steps: int = 500  # save a resumable checkpoint every this many optimizer steps
    checkpoints_total_limit: int | None = 2  # keep only the newest this many checkpoints; None keeps all
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" (the newest in output_dir)
    logger: Logger = "tensorboard"  # where loss, lr, grad norm, images/s and sample grids are logged
    logging_steps: int = 50  # log (and check the loss for NaN/inf) every this many optimizer steps
    save_images_steps: int = 500  # sample a grid with the EMA weights every this many steps (and at the end)
    eval_batch_size: int = 16  # images in each sample grid
    ddpm_num_inference_steps: int = 1000  # denoising steps when sampling grids (T: the paper's ancestral sampler)
    save_denoising_gif: bool = False  # also save the final grid's denoising process as an animated GIF
    eval_every: int | None = None  # measure sample quality (FD, KID, ...) every this many steps and at the end
    eval_at_end: bool = True  # measure sample quality once at the end (other data than the digits: with Inception)
    eval_num_samples: int = 360  # images generated per quality measurement (360: the size of the digits' test split)
    eval_sampler: SamplerName = EVAL_SAMPLER  # the sampler of quality measurements; ddpm (1000 steps) is the paper's
    eval_steps: int = EVAL_STEPS  # its steps; on the main job's model as good as 1000 DDPM steps (README)
    eval_inception_weights: str | None = None  # inception-2015-12-05.pt, to measure FID on data other than the digits

    # Hugging Face Hub
    push_to_hub: bool = False  # upload the final pipeline and sample grid (never checkpoints) to the Hub
    hub_model_id: str | None = None  # the Hub repo, "user/name"; None: the output_dir's name under your user
    hub_private_repo: bool = False  # create the Hub repo as private
    hub_strategy: HubStrategy = "end"  # push at the end only, or also the EMA pipeline at every checkpoint
    hub_token: str | None = field(default=None, repr=False)  # None: HF_TOKEN or `hf auth login`; never saved

    def __post_init__(self):
        positive = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "ddpm_num_steps",
                    "checkpointing_steps", "logging_steps", "save_images_steps", "eval_batch_size",
                    "ddpm_num_inference_steps", "eval_num_samples", "eval_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"--num_epochs must be a positive integer, got {self.num_epochs}.")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"--eval_every must be a positive integer (or left out to never evaluate), "
                             f"got {self.eval_every}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}.")
        if self.ddpm_num_inference_steps > self.ddpm_num_steps:
            raise ValueError(f"--ddpm_num_inference_steps ({self.ddpm_num_inference_steps}) cannot exceed "
                             f"--ddpm_num_steps ({self.ddpm_num_steps}).")
        if self.eval_steps > self.ddpm_num_steps:
            raise ValueError(f"--eval_steps ({self.eval_steps}) cannot exceed --ddpm_num_steps "
                             f"({self.ddpm_num_steps}).")
        if self.data.streaming and self.dataloader_num_workers > 0:
            raise ValueError("--streaming needs --dataloader_num_workers 0: the stream's position, which a resume "
                             "restores, lives in the dataset and DataLoader workers would each hold a copy.")

    def to_dict(self) -> dict[str, Any]:
        """All fields but secrets, with the data fields flattened in: what gets saved beside the model and logged."""
        values = {**asdict(self.data), **asdict(self)}
        del values["data"]
        for name in SECRET_FIELDS:
            values.pop(name)
        return values


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per `DataConfig` and `TrainingConfig` field, defaults from the dataclasses."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, cls in (("data", DataConfig), ("training", TrainingConfig)):
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        for f in fields(cls):
            if f.name != "data":
                default = f.default_factory() if f.default is MISSING else f.default
                add_flag(group, f.name, hints[f.name], default, comments.get(f.name, ""))
    return parser


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> TrainingConfig:
    """Parse CLI flags (`sys.argv` when `argv` is None) into a `TrainingConfig`."""
    namespace = vars(build_parser(description).parse_args(argv))
    data = DataConfig(**{f.name: namespace.pop(f.name) for f in fields(DataConfig)})
    return TrainingConfig(data=data, **namespace)


def add_flag(group: argparse._ArgumentGroup, name: str, hint: Any, default: Any, help_text: str):
    """Add `--name` with the type, choices and default that the type hint and default imply."""
    help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
    help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
    if hint is bool:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        return
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        group.add_argument(f"--{name}", type=type(choices[0]), choices=choices, default=default, help=help_text)
    else:
        group.add_argument(f"--{name}", type=hint, default=default, metavar=hint.__name__.upper(), help=help_text)


def field_comments(cls: type) -> dict[str, str]:
    """The comment at the end of each field's line in `cls`'s source: the help text of its flag."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen or zipped install): flags without help text
        return {}
    comments, line_field = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row = token.start[0]
        if token.type == tokenize.NAME and row not in line_field:
            line_field[row] = token.string
        elif token.type == tokenize.COMMENT and row in line_field:
            comments[line_field[row]] = token.string.lstrip("#").strip()
    return comments
