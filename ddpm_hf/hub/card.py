"""The model card (README.md) of a saved pipeline: Hub metadata, usage, and how the model was trained.

Rendered with huggingface_hub's `ModelCard.from_template` from `model_cards/ddpm_pipeline.md` (shipped
inside the package). Everything on the card is read from the output folder:

- `model_index.json`, `unet/config.json` and weights, `scheduler/scheduler_config.json`: the model;
- `training_config.json`, written by the training run: the dataset and hyper-parameters (`TrainingConfig`
  field names), plus facts about the run when present: `global_step`, `num_processes`, `hardware`,
  `training_time_seconds`, `base_model`;
- `eval_results.json`, when sample quality was measured: what `ddpm-hf evaluate --output` writes, or simply
  `{"fid": 3.17, ...}`;
- images at the top level of the folder (the sample grid): shown on the card and uploaded beside it;
- `scheduler/fast_scheduler_config.json` and `sampler_sweep.png`, written by `ddpm-hf sweep --save`: the
  measured fast sampler, its speed-up and the curve behind it.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from ..pipelines.fast_sampler import SWEEP_PLOT, FastSampler
from ..schedulers.samplers import EVAL_SAMPLER, EVAL_STEPS, SAMPLERS
from ..utils.atomic_files import atomic_write

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "ddpm_pipeline.md"
CARD_NAME = "README.md"
TRAINING_METADATA_FILE = "training_config.json"
EVAL_RESULTS_FILE = "eval_results.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")

# The first line of every generated card's body: a card without it was written by hand, and is left alone.
GENERATED_MARKER = "<!-- ddpm_hf:model-card"
TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "ddpm", "ddpm_hf"]
PIPELINE_TAG = "unconditional-image-generation"
# Metadata keys that may hold credentials: never read into a card, whatever wrote them.
SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
METRIC_NAMES = {"fid": "FID", "frechet_distance": "Fréchet distance", "kid": "KID", "precision": "Precision",
                "recall": "Recall", "confidence": "Classifier confidence", "class_coverage": "Class coverage",
                "confident_share": "Share read with confidence >= 0.9",
                "inception_score": "Inception Score"}
PREDICTION_TARGETS = {"epsilon": "the noise ε (epsilon)", "sample": "the clean image x₀ (sample)",
                      "v_prediction": "v = α_t ε − σ_t x₀ (v_prediction)"}
UNET_WEIGHTS = re.compile(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors")  # no variants (.fp16, ...)


def render_model_card(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    *,
    eval_results: dict[str, Any] | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    r"""
    Renders the model card of a saved pipeline folder.

    Args:
        folder (`str` or `os.PathLike`): A saved pipeline (`model_index.json`, `unet/`, `scheduler/`), usually
            a training run's `--output_dir`.
        repo_id (`str`, *optional*): The Hub repo the usage snippets load from; defaults to the run's
            `hub_model_id`, else `"your-username/<name of the run's output_dir, or of the folder>"`.
        eval_results (`dict`, *optional*): Metrics such as `{"fid": 3.17}`, or the record `ddpm-hf evaluate
            --output` writes; defaults to the folder's `eval_results.json`. They go into the card's `model-index`.
        base_model (`str`, *optional*): The Hub id of the model this one was fine-tuned from.
        license (`str`, defaults to `"apache-2.0"`): The license of the weights.

    Returns:
        [`~huggingface_hub.ModelCard`]: the card; `str(card)` is the README.md text.

    Example:

    ```py
    >>> card = render_model_card("outputs/ddpm-digits", "alice/ddpm-digits")
    >>> card.data.pipeline_tag
    'unconditional-image-generation'
    ```
    """
    folder = Path(folder)
    training = read_training_metadata(folder)
    evaluation = eval_results if eval_results is not None else _read_json(folder / EVAL_RESULTS_FILE)
    metrics = _metrics(evaluation)
    unet_config = _read_json(folder / "unet" / "config.json")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    # A training run writes its card in a staging folder before renaming it to output_dir: name it after the latter.
    name = Path(training["output_dir"]).resolve().name if training.get("output_dir") else folder.resolve().name
    repo_id = repo_id or training.get("hub_model_id") or f"your-username/{name}"
    model_title = repo_id.split("/")[-1]
    dataset = _dataset(training)

    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        datasets=[dataset.hub_id] if dataset.hub_id else None,
        base_model=base_model or training.get("base_model"),
        model_name=model_title if metrics else None,
        eval_results=[EvalResult(task_type=PIPELINE_TAG, dataset_type=dataset.name, dataset_name=dataset.name,
                                 metric_type=name, metric_name=METRIC_NAMES.get(name, name), metric_value=value)
                      for name, value in metrics.items()] or None,
    )
    num_train_timesteps = scheduler_config.get("num_train_timesteps", 1000)
    fast_sampler = FastSampler.load(folder)
    images = sample_images(folder)
    resolution = _resolution(unet_config)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_title=model_title,
        repo_id=repo_id,
        image_description=f"{resolution} {_colour(unet_config)} images",
        trained_on=dataset.text if training else None,
        sample_images=[image for image in images if image != SWEEP_PLOT],
        num_train_timesteps=num_train_timesteps,
        fast=_fast_sampling(fast_sampler, num_train_timesteps, SWEEP_PLOT in images and fast_sampler is not None),
        model_details=_model_details(folder / "unet", unet_config, training),
        scheduler_details=_scheduler_details(scheduler_config),
        training_details=_training_details(training, dataset),
        eval_details=[(METRIC_NAMES.get(name, name), f"{value:.4g}") for name, value in metrics.items()],
        eval_setup=_evaluation_setup(evaluation),
        dataset_description=dataset.text,
        resolution=f"{resolution} pixels",
    )


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None, *, overwrite: bool = False,
                     **card_kwargs: Any) -> Path:
    """Renders the card into `folder/README.md`, unless a hand-written card is there (`overwrite=False`).

    Returns the card's path. Keyword arguments are those of [`render_model_card`].
    """
    path = Path(folder) / CARD_NAME
    if path.is_file() and not overwrite and not is_generated_card(path):
        return path
    card = render_model_card(folder, repo_id, **card_kwargs)
    with atomic_write(path) as temporary:
        card.save(temporary)
    return path


def is_generated_card(path: str | os.PathLike) -> bool:
    """Whether a README.md was generated by ddpm_hf (and may be regenerated)."""
    return GENERATED_MARKER in Path(path).read_text(encoding="utf-8")


def read_training_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The run's `training_config.json` without any key that could hold a credential; {} if there is none."""
    metadata = _read_json(Path(folder) / TRAINING_METADATA_FILE)
    return {key: value for key, value in metadata.items() if not SECRET_KEY.search(key)}


def sample_images(folder: str | os.PathLike) -> list[str]:
    """Names of the images at the top level of `folder` (the sample grid, a denoising GIF), sorted."""
    return sorted(path.name for path in Path(folder).iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error


class Dataset(NamedTuple):
    hub_id: str | None  # None when the data is not on the Hub
    name: str  # a short name, for the model-index
    text: str  # how the card's prose refers to it (Markdown)


def _dataset(training: dict[str, Any]) -> Dataset:
    """What the run trained on, as `training_config.json` says (the embedded digits when it names no data)."""
    if training.get("dataset_name"):
        hub_id = training["dataset_name"]
        return Dataset(hub_id, hub_id, f"[{hub_id}](https://huggingface.co/datasets/{hub_id})")
    if training.get("train_data_dir"):
        return Dataset(None, "local image folder", "the images of a local folder")
    if training:
        return Dataset(None, "sklearn-digits", "scikit-learn's handwritten digits (8×8 scans, upsampled: "
                                               "ddpm_hf's embedded default data)")
    return Dataset(None, "unknown", "its training data")


def _metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The measured values of an evaluation record (not its counts, settings or spreads); a Fréchet distance in
    Inception features is the FID."""
    is_fid = str(evaluation.get("features", "inception")).startswith("inception")
    return {("fid" if name == "frechet_distance" and is_fid else name): float(value)
            for name, value in evaluation.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_std")
            and not name.startswith("num_") and name not in ("steps", "seed", "seconds")}


def _evaluation_setup(evaluation: dict[str, Any]) -> str | None:
    """How the metrics were measured, in one sentence, when the record says."""
    if "num_samples" not in evaluation:
        return None
    get = evaluation.get
    sampler = f" ({get('scheduler', 'ddpm')}, {get('steps')} steps)" if get("steps") else ""
    against = f" against {get('reference')}" if get("reference") else ""
    references = f" ({get('num_reference'):,} images)" if get("num_reference") else ""
    features = f", in {get('features')} features" if get("features") else ""
    text = f"Measured on {get('num_samples'):,} samples{sampler}{against}{references}{features}."
    floor = get("floor")
    if floor:
        text += (f" The same distance for {floor['num_images']:,} held-out real images ({floor['description']}), the "
                 f"floor no model can be expected to beat, is {floor['frechet_distance']:.4g} ± {floor['std']:.2g}.")
    return text


def _fast_sampling(fast_sampler: FastSampler | None, num_train_timesteps: int, has_plot: bool) -> dict[str, Any]:
    """The card's fast-sampling section: the measured sampler (`ddpm-hf sweep --save`), or ddpm_hf's default one."""
    if fast_sampler is None:
        name, steps = EVAL_SAMPLER, min(EVAL_STEPS, num_train_timesteps)
    else:
        name, steps = fast_sampler.sampler, fast_sampler.num_inference_steps
    sampler = SAMPLERS[name]
    config = fast_sampler.scheduler_config if fast_sampler is not None else sampler.settings
    arguments = ["pipe.scheduler.config"] + [f"{key}={_python_literal(config[key])}" for key in sampler.settings
                                             if key in config]
    settings = textwrap.fill(", ".join(arguments), width=100, initial_indent="    ", subsequent_indent="    ")
    library = "ddpm_hf" if sampler.scheduler_class.__module__.startswith("ddpm_hf") else "diffusers"
    return {
        "measured": fast_sampler is not None,
        "title": sampler.title,
        "paper": sampler.paper,
        "steps": steps,
        "class_name": sampler.scheduler_class.__name__,
        "import_line": f"from {library} import {sampler.scheduler_class.__name__}",
        "arguments": settings,
        "plot": SWEEP_PLOT if has_plot else None,
        "summary": _sweep_summary(sampler.title, fast_sampler, num_train_timesteps) if fast_sampler else None,
    }


def _sweep_summary(title: str, fast_sampler: FastSampler, num_train_timesteps: int) -> str:
    """What the sweep measured, in two sentences."""
    measured = fast_sampler.measurement
    steps = fast_sampler.num_inference_steps
    name = "FD_digits" if str(measured.get("features", "")).startswith("digits") else "FID"
    text = (f"`ddpm-hf sweep` sampled {measured.get('num_samples', '?')} images with each sampler and number of steps, "
            f"and scored them against {measured.get('reference', 'the training data')}. The fastest within "
            f"{measured.get('tolerance', 0):.2f} of the best distance is **{title} with {steps} steps**: {name} "
            f"{measured.get('frechet_distance', float('nan')):.2f}")
    others = []
    if measured.get("ddpm_frechet_distance") is not None:
        others.append(f"{measured['ddpm_frechet_distance']:.2f} for {num_train_timesteps:,} DDPM steps")
    floor = measured.get("floor")
    if floor:
        others.append(f"{floor['frechet_distance']:.2f} ± {floor['std']:.2f} for {floor['num_images']} real images")
    if others:
        text += ", against " + " and ".join(others)
    calls = measured.get("model_calls", steps)
    return (text + f". That is **{num_train_timesteps / calls:.0f}x fewer model calls** ({calls} instead of "
            f"{num_train_timesteps:,}).")


def _python_literal(value: Any) -> str:
    """A config value as Python source (JSON's true/null are Python's True/None)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _resolution(unet_config: dict[str, Any]) -> str:
    size = unet_config.get("sample_size", "?")
    height, width = size if isinstance(size, list) else (size, size)
    return f"{height}×{width}"


def _colour(unet_config: dict[str, Any]) -> str:
    channels = unet_config.get("in_channels", 3)
    return {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")


def _model_details(unet_folder: Path, config: dict[str, Any], training: dict[str, Any]) -> list[tuple[str, str]]:
    size = config.get("sample_size")
    levels = config.get("down_block_types", [])
    attention = [f"{size // 2**level}×{size // 2**level}" for level, block in enumerate(levels)
                 if "Attn" in block and isinstance(size, int)]
    details = [
        ("Network", "`UNet2DModel` (diffusers' layout and weight names)"),
        ("Parameters", _format_parameters(_count_parameters(unet_folder))),
        ("Input", f"{_resolution(config)}, {_count(config.get('in_channels', 3), 'channel', 'channels')}"),
        ("Channels per level", str(tuple(config.get("block_out_channels", ())))),
        ("ResNet blocks per level", str(config.get("layers_per_block", "?"))),
        ("Self-attention at", ", ".join(attention) or "none"),
    ]
    if "use_ema" in training:
        details.append(("Weights", "exponential moving average of the training weights" if training["use_ema"]
                        else "the training weights at the last step"))
    return details


def _scheduler_details(config: dict[str, Any]) -> list[tuple[str, str]]:
    betas = f"{config.get('beta_schedule', 'linear')}"
    if config.get("beta_schedule", "linear") in ("linear", "scaled_linear"):
        betas += f", {config.get('beta_start', 1e-4):g} → {config.get('beta_end', 0.02):g}"
    return [
        ("Class", f"`{config.get('_class_name', 'DDPMScheduler')}`"),
        ("Diffusion steps T", str(config.get("num_train_timesteps", 1000))),
        ("β schedule", betas),
        ("The UNet predicts", PREDICTION_TARGETS.get(config.get("prediction_type", "epsilon"), "?")),
        ("Reverse-process variance", config.get("variance_type", "fixed_small")),
        ("Clip x₀ to [-1, 1]", "yes" if config.get("clip_sample", True) else "no"),
    ]


def _training_details(training: dict[str, Any], dataset: Dataset) -> list[tuple[str, str]]:
    """The rows of the card's training table, for the facts the run recorded."""
    if not training:
        return []
    get = training.get
    data = dataset.text
    if get("dataset_config_name"):
        data += f", configuration `{get('dataset_config_name')}`"
    if get("dataset_name") and get("split"):
        data += f", split `{get('split')}`"
    if get("max_train_samples"):
        data += f", a random subset of {get('max_train_samples'):,} images"
    rows = [("Dataset", data)]
    if get("resolution"):
        rows.append(("Resolution", f"{get('resolution')}×{get('resolution')}"))
    if get("global_step") or get("max_train_steps"):
        rows.append(("Optimizer steps", f"{get('global_step') or get('max_train_steps'):,}"))
    if get("train_batch_size"):
        processes, accumulation = get("num_processes", 1), get("gradient_accumulation_steps", 1)
        total = get("train_batch_size") * processes * accumulation
        rows.append(("Batch size", f"{total} = {get('train_batch_size')} per process × "
                                   f"{_count(processes, 'process', 'processes')} × "
                                   f"{_count(accumulation, 'accumulation step', 'accumulation steps')}"))
    if get("learning_rate"):
        warmup = _count(get("lr_warmup_steps", 0), "warmup step", "warmup steps")
        rows.append(("Optimizer", f"AdamW, learning rate {get('learning_rate'):g}, "
                                  f"{get('lr_scheduler', 'constant')} schedule with {warmup}"))
    if "use_ema" in training:
        rows.append(("EMA", f"max decay {get('ema_max_decay')}" if get("use_ema") else "not used"))
    if get("prediction_type"):
        weighting = f", min-SNR-γ weighting (γ = {get('snr_gamma')})" if get("snr_gamma") else ""
        rows.append(("Loss", f"MSE on the {get('prediction_type')} target{weighting}"))
    rows.append(("Mixed precision", get("mixed_precision") or "no (fp32)"))
    for key, name in (("hardware", "Hardware"), ("seed", "Seed")):
        if get(key) is not None:
            rows.append((name, str(get(key))))
    if get("training_time_seconds"):
        rows.append(("Training time", _format_duration(get("training_time_seconds"))))
    return rows


def _count_parameters(unet_folder: Path) -> int:
    """Number of weights in the UNet's safetensors files, read from their headers."""
    total = 0
    for path in unet_folder.glob("*.safetensors"):
        if UNET_WEIGHTS.fullmatch(path.name):
            with safe_open(path, framework="np") as weights:  # reads only the header; no torch import
                total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"


def _format_parameters(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"
