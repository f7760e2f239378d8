"""`TrainingConfig`: every training default in one typed dataclass, and the CLI flags generated from it.

Each field becomes a `--flag` of the same name: its type gives the argparse type, a `Literal` gives
the choices, a `bool` gives `--flag` / `--no-flag`, and the comment beside the field is its help text.
The data fields come from [`DataConfig`] and take the same flag names (`--resolution`, ...).
"""

from __future__ import annotations

import argparse
import inspect
import io
import logging
import math
import sys
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Literal

from ..schedulers.samplers import EVAL_SAMPLER, EVAL_STEPS, SamplerName
from ..schedulers.scheduling_ddpm import BetaSchedule, PredictionType, VarianceType
from ..data import DataConfig
from .presets import load_unet_config
from .recipes import recipe_settings

logger = logging.getLogger(__name__)

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
    snr_gamma: float | None = 5.0  # min-SNR-gamma loss weights (Hang et al. 2023); none: plain MSE (README, recipes)
    variance_type: VarianceType = "fixed_small"  # the sampler's sigma_t^2; learned_range trains it (hybrid loss)
    vlb_weight: float = 0.001  # lambda of L_simple + lambda L_vlb with learned variances (Nichol & Dhariwal 2021)

    # Optimisation
    seed: int = 0  # seeds the weights, the data order and every training step's noise
    train_batch_size: int = 64  # images per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (global batch = this x batch x processes)
    max_train_steps: int = 1000  # optimizer steps to train for (ignored when --num_epochs is given)
    max_train_minutes: float | None = None  # a wall-clock budget: the LR schedule spans the steps that fit in it
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
    ema_warmup: bool = True  # ramp the decay up (power above); off: --ema_max_decay from the first step (the paper)
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
    eval_steps: int = EVAL_STEPS  # its steps; on the main job's model at least as good as 1000 DDPM steps
    eval_inception_weights: str | None = None  # inception-2015-12-05.pt, to measure FID on data other than the digits

    # Hugging Face Hub
    push_to_hub: bool = False  # upload the final pipeline and sample grid (never checkpoints) to the Hub
    hub_model_id: str | None = None  # the Hub repo, "user/name"; None: the output_dir's name under your user
    hub_private_repo: bool = False  # create the Hub repo as private
    hub_strategy: HubStrategy = "end"  # push at the end only, or also the EMA pipeline at every checkpoint
    hub_token: str | None = field(default=None, repr=False)  # None: HF_TOKEN or `hf auth login`; never saved

    # The command line
    recipe: str | None = None  # a paper's whole configuration (ddpm-cifar10); flags given with it override it
    dry_run: bool = False  # print the resolved configuration as JSON and exit, reading and writing nothing

    def __post_init__(self):
        check_numbers(self)
        if self.ddpm_num_inference_steps > self.ddpm_num_steps:
            raise ValueError(f"--ddpm_num_inference_steps ({self.ddpm_num_inference_steps}) cannot exceed "
                             f"--ddpm_num_steps ({self.ddpm_num_steps}).")
        if self.variance_type == "learned":
            raise ValueError("--variance_type learned (the variance itself as output) cannot be trained here; use "
                             "learned_range (an interpolation between beta~_t and beta_t, trained with L_hybrid).")
        if self.variance_type == "learned_range" and self.prediction_type != "epsilon":
            raise ValueError(f"--variance_type learned_range trains with the hybrid loss of an epsilon-prediction "
                             f"model; --prediction_type {self.prediction_type} is not supported with it.")
        if self.recipe is not None:
            recipe_settings(self.recipe)  # an unknown name lists the recipes
        if self.eval_steps > self.ddpm_num_steps:
            raise ValueError(f"--eval_steps ({self.eval_steps}) cannot exceed --ddpm_num_steps "
                             f"({self.ddpm_num_steps}).")
        if self.data.streaming and self.dataloader_num_workers > 0:
            raise ValueError("--streaming needs --dataloader_num_workers 0: the stream's position, which a resume "
                             "restores, lives in the dataset and DataLoader workers would each hold a copy.")

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> TrainingConfig:
        """The configuration `recipe` sets (see `ddpm_hf.training.recipes`), with `overrides`, fields of this class
        or of [`DataConfig`], on top: `TrainingConfig.from_recipe("ddpm-cifar10", dataset_name="uoft-cs/cifar10")`."""
        settings = {**recipe_settings(recipe), **overrides}
        data_fields = {f.name for f in fields(DataConfig)}
        data = DataConfig(**{name: settings.pop(name) for name in list(settings) if name in data_fields})
        return cls(data=data, recipe=recipe, **settings)

    def resolved(self) -> dict[str, Any]:
        """What `--dry_run` prints: every setting, the UNet config that `model_config` names (channels and size
        follow the data) and the noise scheduler's, with the settings that override the recipe."""
        values = self.to_dict()
        recipe = recipe_settings(self.recipe) if self.recipe else {}
        return {
            **values,
            "recipe_overrides": {name: {"recipe": value, "given": values[name]} for name, value in recipe.items()
                                 if values[name] != value},
            "unet": load_unet_config(self.model_config),
            "scheduler": {"num_train_timesteps": self.ddpm_num_steps, "beta_schedule": self.ddpm_beta_schedule,
                          "prediction_type": self.prediction_type, "variance_type": self.variance_type},
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields but secrets, with the data fields flattened in: what gets saved beside the model and logged."""
        values = {**asdict(self.data), **asdict(self)}
        del values["data"]
        for name in SECRET_FIELDS:
            values.pop(name)
        return values


# Every number in the config must be finite and positive, except these: (lowest, whether it is allowed, highest,
# whether it is allowed). A field left at None (snr_gamma, num_epochs, eval_every, ...) is not checked.
NUMBER_RANGES = {
    "seed": (0, True, math.inf, False),
    "lr_warmup_steps": (0, True, math.inf, False),
    "adam_weight_decay": (0, True, math.inf, False),
    "dataloader_num_workers": (0, True, math.inf, False),
    "adam_beta1": (0, True, 1, False),
    "adam_beta2": (0, True, 1, False),
    "ema_max_decay": (0, True, 1, True),
    "vlb_weight": (0, True, math.inf, False),
}


def check_numbers(config: Any):
    """Raise a one-line `ValueError` naming the flag for a number outside its range, NaN or infinite."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if float in typing.get_args(hints[f.name]) or hints[f.name] is float:
            value = float(value)  # a float flag given as an int: say "number", not "integer"
        low, low_allowed, high, high_allowed = NUMBER_RANGES.get(f.name, (0, False, math.inf, False))
        above = value >= low if low_allowed else value > low
        below = value <= high if high_allowed else value < high
        if not (math.isfinite(value) and above and below):
            kind = "integer" if isinstance(value, int) else "number"
            if high == math.inf:
                wanted = f"a positive {kind}" if not low_allowed else f"an {kind} >= 0" if kind == "integer" else ">= 0"
            else:
                wanted = f"in [{low}, {high}{']' if high_allowed else ')'}"
            raise ValueError(f"--{f.name} must be {wanted}, got {value}.")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with errors on one line: the usage of 70 flags would bury them (--help shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per `DataConfig` and `TrainingConfig` field, defaults from the dataclasses."""
    parser = OneLineErrorParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """Parse CLI flags (`sys.argv` when `argv` is None) into a `TrainingConfig`; a value out of its range exits
    like any bad flag (status 2, one line naming it).

    With `--recipe NAME` the recipe's settings are the defaults, so that any flag given overrides them; each
    override is reported (a warning naming the flag, its value and the recipe's).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe")
    recipe = recipe_parser.parse_known_args(argv)[0].recipe
    parser = build_parser(description)
    settings = {}
    if recipe is not None:
        try:
            settings = recipe_settings(recipe)
        except ValueError as error:
            parser.error(str(error))
        parser.set_defaults(**settings)
    namespace = vars(parser.parse_args(argv))
    for name, value in settings.items():
        if namespace[name] != value:
            logger.warning(f"--{name} {namespace[name]} overrides the {recipe} recipe's {value}.")
    try:
        data = DataConfig(**{f.name: namespace.pop(f.name) for f in fields(DataConfig)})
        return TrainingConfig(data=data, **namespace)
    except ValueError as error:
        parser.error(str(error).removesuffix("."))


def add_flag(group: argparse._ArgumentGroup, name: str, hint: Any, default: Any, help_text: str):
    """Add `--name` with the type, choices and default that the type hint and default imply."""
    help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
    help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
    if hint is bool:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        return
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:  # X | None: the flag takes an X, or `none` (to turn off a setting whose default is not None)
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        group.add_argument(f"--{name}", type=type(choices[0]), choices=choices, default=default, help=help_text)
    else:
        group.add_argument(f"--{name}", type=none_or(hint) if optional else hint, default=default,
                           metavar=hint.__name__.upper(), help=help_text)


def none_or(parse: type) -> Callable[[str], Any]:
    """A flag type that reads `none` as None and anything else with `parse` (argparse names `parse` on errors)."""
    def parse_or_none(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_or_none.__name__ = parse.__name__  # argparse: "invalid float value: 'x'"
    return parse_or_none


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
