"""DDPMPipeline: unconditional image generation with a UNet and a noise scheduler."""

from __future__ import annotations

import functools
import inspect
import json
import os
import tempfile
import warnings
from typing import Any, Callable, Literal

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import CommitInfo

from .. import hub
from ..models import UNet2DModel
from ..schedulers import DDPMScheduler
from .fast_sampler import FAST_SCHEDULER_CONFIG, FastSampler
from .fast_sampling import CompiledOrEager, CUDAGraphStep, FastSampling

OutputType = Literal["pil", "np", "pt"]
OUTPUT_TYPES = ("pil", "np", "pt")

# ddpm_hf re-implements these diffusers classes with identical configs and weights. They are
# recorded in model_index.json under diffusers' names, so a pipeline saved here loads in plain
# diffusers, and they are loaded back into ddpm_hf's own classes.
DROP_IN_CLASSES: dict[str, type] = {"UNet2DModel": UNet2DModel, "DDPMScheduler": DDPMScheduler}

StepCallback = Callable[["DDPMPipeline", int, torch.Tensor, dict[str, torch.Tensor]], "dict[str, Any] | None"]


class DDPMPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional image generation with DDPM (Ho et al., 2020).

    A drop-in replacement for `diffusers.DDPMPipeline`: same components, same call signature and, for
    the same weights and seed, the same images. Beyond diffusers' version it honours schedulers that
    scale the model input or start from a noise scale other than 1 (DDIM, DPM-Solver, Euler, ...),
    accepts per-sample generators, and calls a callback after every step.

    Args:
        unet ([`UNet2DModel`]): The denoising network, predicting noise (or x_0, or v) from x_t and t.
        scheduler ([`SchedulerMixin`]): The noise scheduler; [`DDPMScheduler`] or any diffusers scheduler.

    Example:

    ```py
    >>> from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel

    >>> unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
    ...                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    >>> pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    >>> images = pipe(batch_size=4, num_inference_steps=50).images  # a list of PIL images
    >>> pipe.save_pretrained("my-ddpm")  # loads with ddpm_hf or with plain diffusers
    >>> pipe.enable_fast_sampling()  # bf16 autocast, channels_last, torch.compile; CUDA graphs on GPU
    ```

    A pipeline measured by `ddpm-hf sweep MODEL --save` samples with its fastest sampler of full quality:

    ```py
    >>> pipe = DDPMPipeline.from_pretrained("outputs/ddpm-digits").use_fast_sampler()
    >>> images = pipe(batch_size=16).images  # e.g. DPM-Solver++ with 10 steps instead of 1,000 DDPM steps
    ```
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.fast_sampling: FastSampling | None = None  # set by enable_fast_sampling
        self._compiled_unet: CompiledOrEager | None = None
        self._weights_seen: tuple[tuple[int, int], ...] | None = None  # (address, version) of each UNet tensor
        self.fast_sampler: FastSampler | None = None  # the measured fast sampler, read by from_pretrained
        self._fast_scheduler: SchedulerMixin | None = None  # the scheduler use_fast_sampler() set

    def use_fast_sampler(self) -> "DDPMPipeline":
        r"""
        Samples with the sampler and number of steps that `ddpm-hf sweep MODEL --save` measured as the fastest to
        reach this model's best quality (saved in `scheduler/fast_scheduler_config.json`, which diffusers ignores).

        Sets `self.scheduler` to it; while that scheduler is in place, `num_inference_steps` defaults to the measured
        number of steps. The weights are not touched.

        Returns:
            The pipeline itself, so that `DDPMPipeline.from_pretrained(path).use_fast_sampler()` is a one-liner.

        Raises:
            ValueError: if no fast sampler was measured for this pipeline.
        """
        if self.fast_sampler is None:
            name = self.config.get("_name_or_path") or "MODEL"
            raise ValueError(f"{name} has no measured fast sampler (scheduler/{FAST_SCHEDULER_CONFIG}): measure and "
                             f"save one with `ddpm-hf sweep {name} --save`, or choose a scheduler yourself.")
        self.scheduler = self._fast_scheduler = self.fast_sampler.make_scheduler()
        return self

    # The measured fast sampler's config, then diffusers' own save_pretrained (its signature too, through
    # functools.wraps, whatever the release), which leaves other files in scheduler/ alone and, with
    # push_to_hub=True, uploads the whole folder with it.
    @functools.wraps(DiffusionPipeline.save_pretrained, assigned=("__module__", "__name__", "__qualname__"))
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        if self.fast_sampler is not None:
            self.fast_sampler.save(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    save_pretrained.__doc__ = (f"{DiffusionPipeline.save_pretrained.__doc__}\n\n"
                               "        ddpm_hf: a measured fast sampler is saved too "
                               "(`scheduler/fast_scheduler_config.json`, which diffusers ignores).")

    def enable_fast_sampling(
        self,
        *,
        dtype: torch.dtype | None = torch.bfloat16,
        channels_last: bool = True,
        compile: bool = True,
        cuda_graph: bool | None = None,
    ) -> None:
        r"""
        Runs the denoising loop faster. Every option is independent; with `dtype=None` the images stay those of the
        plain loop up to float rounding (about 1e-6).

        Measured effect (`benchmarks/bench_sampling.py`, 2 CPU cores with AVX-512 BF16, images/s over the plain
        loop): the 1.1M-parameter network gains 1.5x at 16 px and 3x at 32 px. diffusers' `DDPMPipeline` in its
        own documented fast mode (bf16 weights, channels_last, torch.compile) is 1.04-1.07x slower than this. See
        the README's table; CUDA graphs are for GPUs and have not been timed yet.

        The loop never synchronises host and device: the scheduler's coefficient tables and timesteps live on the
        device, and the UNet and `DDPMScheduler.step` read timesteps as tensors (no `.item()`, no branching on values).

        Args:
            dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): Run the UNet under autocast in bfloat16
                or float16 (convolutions and matmuls in low precision, normalisations in float32). The sample and
                the scheduler step stay in the weights' dtype, so the noise drawn is that of the plain loop.
                `None` (or `torch.float32`): no autocast.
            channels_last (`bool`, defaults to `True`): Convert the UNet's weights (in place, as diffusers' docs do)
                and the sample to the NHWC layout, which oneDNN and cuDNN convolve fastest.
            compile (`bool`, defaults to `True`): `torch.compile` the UNet call (one graph, static shapes) on its
                first call: a minute or more on a CPU, again for each new batch size or resolution. The compiled
                graph holds the weights as constants (inductor's freezing: casts done and oneDNN weights packed
                once); a call that finds the weights changed recompiles. If compiling fails (say, no C++
                compiler), a warning says why and sampling continues in eager mode.
            cuda_graph (`bool`, *optional*): Capture one whole step (UNet and scheduler) in a CUDA graph after two
                eager warm-up steps and replay it for the others, which removes the per-kernel launch cost. Needs a
                CUDA device, ddpm_hf's [`DDPMScheduler`] (other schedulers keep per-step state in Python) and CUDA
                generators (or none): the noise is drawn inside the graph. `None` captures wherever those hold;
                `True` raises a `ValueError` at call time where they do not.

        Raises:
            ValueError: for a `dtype` other than bfloat16, float16, float32 or None, or non-boolean flags.
        """
        self.fast_sampling = FastSampling(dtype=dtype, channels_last=channels_last, compile=compile,
                                          cuda_graph=cuda_graph)
        self.unet.to(memory_format=self.fast_sampling.memory_format)
        self._compiled_unet = CompiledOrEager(self._predict) if compile else None

    def disable_fast_sampling(self) -> None:
        """Back to the plain loop (and the UNet's weights back to the contiguous NCHW layout)."""
        self.fast_sampling = None
        self._compiled_unet = None
        self.unet.to(memory_format=torch.contiguous_format)

    def register_to_config(self, **kwargs: Any) -> None:
        """Records ddpm_hf's drop-in components under diffusers' names in model_index.json."""
        for name, value in kwargs.items():
            if isinstance(value, (tuple, list)) and len(value) == 2 and _is_drop_in(*value):
                kwargs[name] = ("diffusers", value[1])
        super().register_to_config(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "DDPMPipeline":
        r"""
        Loads a saved pipeline into ddpm_hf's own [`UNet2DModel`] and [`DDPMScheduler`].

        Accepts what `diffusers.DiffusionPipeline.from_pretrained` accepts (a Hub repo id with
        `revision`, `cache_dir`, `token`, ..., or a local folder; `torch_dtype`, also per component,
        `variant`, `device_map`, `low_cpu_mem_usage`; not `quantization_config`), in both layouts
        diffusers writes: nested (`model_index.json`, `unet/`, `scheduler/`) and flat
        (`config.json`, `scheduler_config.json` and the weights at the root, like
        `google/ddpm-cifar10-32`). Components of other classes (say a `DDIMScheduler`) load as the
        diffusers classes they name. A fast sampler measured by `ddpm-hf sweep --save`
        (`scheduler/fast_scheduler_config.json`) becomes `pipe.fast_sampler`, for [`use_fast_sampler`]; an
        unreadable one is left out with a warning.

        Raises:
            OSError: if the folder is not a saved pipeline, or a component's files are missing or corrupt.
            ValueError: if the weights do not match the network's configuration.
        """
        name = str(pretrained_model_name_or_path)
        folder = name if os.path.isdir(name) else cls._download_folder(name, kwargs)
        model_index = _read_model_index(folder)

        if kwargs.get("quantization_config") is not None:
            raise ValueError("quantization_config is not supported by ddpm_hf's DDPMPipeline: load it without, or "
                             "quantize the UNet afterwards.")
        if model_index is None:
            pipe = cls(unet=UNet2DModel.from_pretrained(folder, **_model_kwargs(kwargs, "unet")),
                       scheduler=DDPMScheduler.from_pretrained(folder))
            pipe.register_to_config(_name_or_path=name)
            return pipe

        loaded = []
        for component, (library, class_name) in _components(model_index).items():
            if component in kwargs or not _is_drop_in(library, class_name):
                continue
            kwargs[component] = _load_component(folder, component, DROP_IN_CLASSES[class_name], kwargs)
            loaded.append(component)
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=name)
        # device_map="balanced": diffusers places the components; it does not move those we loaded ourselves.
        device_map = getattr(pipe, "hf_device_map", None)
        for component, device in (device_map.items() if isinstance(device_map, dict) else ()):
            if component in loaded and isinstance(getattr(pipe, component), torch.nn.Module):
                getattr(pipe, component).to(device)
        try:
            pipe.fast_sampler = FastSampler.load(folder)
        except ValueError as error:  # the pipeline itself is intact: load it, without the fast sampler
            warnings.warn(str(error), stacklevel=2)
        return pipe

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None, *,
                    revision: str | None = None) -> CommitInfo:
        r"""
        Uploads the pipeline (safetensors) and a model card to a Hub repo, creating the repo if needed.

        The card describes the UNet and the scheduler and shows how to load the repo with ddpm_hf and with plain
        diffusers. To push a training run's output folder with its sample images and training details, use
        [`ddpm_hf.hub.push_to_hub`] or `ddpm-hf push OUTPUT_DIR REPO_ID`.

        Args:
            repo_id (`str`): `"user/name"` or `"org/name"`; a bare `"name"` goes under the token's user.
            commit_message (`str`, *optional*): Defaults to `"Upload DDPM pipeline"`.
            private (`bool`, *optional*): Create the repo as private (ignored if it exists).
            token (`str`, *optional*): A token with write access; defaults to `HF_TOKEN`, then the stored login.
            create_pr (`bool`, defaults to `False`): Only `False`: push to a branch with `revision=` instead.
            safe_serialization (`bool`, defaults to `True`): Only `True`: weights go to the Hub as safetensors only.
            variant (`str`, *optional*): Save the weights as `diffusion_pytorch_model.<variant>.safetensors`
                (load them with `from_pretrained(..., variant=)`).
            subfolder (`str`, *optional*): Only `None`: the pipeline goes to the root of the repo.
            revision (`str`, *optional*): The branch to commit to, created if needed; defaults to `main`.

        Returns:
            [`~huggingface_hub.CommitInfo`]: `.oid` loads this upload back with `from_pretrained(..., revision=)`.

        Raises:
            ValueError: for `create_pr=True`, `safe_serialization=False` or a `subfolder`, which ddpm_hf does not do.
        """
        unsupported = {"create_pr=True": create_pr, "safe_serialization=False": not safe_serialization,
                       f"subfolder={subfolder!r}": subfolder}
        if any(unsupported.values()):
            asked = ", ".join(option for option, given in unsupported.items() if given)
            raise ValueError(f"DDPMPipeline.push_to_hub does not support {asked}: it commits safetensors weights to "
                             "the root of a branch (`revision=`).")
        if variant is None:
            return hub.push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                                   revision=revision)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=True, variant=variant)
            return hub.push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                                   revision=revision)

    @classmethod
    def _download_folder(cls, repo_id: str, kwargs: dict[str, Any]) -> str:
        """Downloads (or finds in the cache) a Hub repo, through diffusers' own download path."""
        download_keys = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
                         "variant", "use_safetensors")
        return cls.download(repo_id, **{key: kwargs[key] for key in download_keys if key in kwargs})

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (batch_size, self.unet.config.in_channels, height, width)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images by running the reverse process from pure noise.

        Args:
            batch_size (`int`, defaults to 1): Number of images to generate.
            generator (`torch.Generator` or a list of them, *optional*): Makes generation
                deterministic; a list gives each image its own generator (length `batch_size`).
            num_inference_steps (`int`, *optional*): Number of denoising steps; at most the scheduler's
                `num_train_timesteps`. Defaults to 1000, or to the measured number after [`use_fast_sampler`].
            output_type (`"pil"`, `"np"` or `"pt"`, defaults to `"pil"`): PIL images, a NumPy array
                (B, H, W, C) or a tensor (B, C, H, W), with values in [0, 1].
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): Called after every step as
                `callback(pipe, step_index, timestep, {"sample": x_{t-1}, "pred_original_sample": x_0})`
                (`pred_original_sample` only where the scheduler returns it). If it returns a dict
                holding `"sample"`, that tensor replaces the sample: collect intermediate images or
                steer the process.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with `.images`, or a tuple `(images,)`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for batch_size {batch_size}: pass one per image.")

        if num_inference_steps is None:
            fast = self._fast_scheduler is not None and self.scheduler is self._fast_scheduler
            num_inference_steps = self.fast_sampler.num_inference_steps if fast else 1000
        device = self._execution_device
        # set_timesteps validates num_inference_steps before any noise is drawn.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # On MPS diffusers draws the noise on the CPU (MPS draws differ); so do we, for the same images.
        noise_device = torch.device("cpu") if device.type == "mps" else device
        sample = randn_tensor(self._sample_shape(batch_size), generator=generator, device=noise_device,
                              dtype=self.unet.dtype).to(device)
        sample = sample * self.scheduler.init_noise_sigma
        denoise = self._denoising_step(device, generator)
        if self.fast_sampling is not None:
            sample = sample.contiguous(memory_format=self.fast_sampling.memory_format)

        for step_index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            step = denoise(sample, timestep)
            sample = step.prev_sample
            if callback_on_step_end is not None:
                state = {"sample": sample}
                if getattr(step, "pred_original_sample", None) is not None:
                    state["pred_original_sample"] = step.pred_original_sample
                sample = (callback_on_step_end(self, step_index, timestep, state) or state).get("sample", sample)

        images = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _denoising_step(self, device: torch.device, generator: torch.Generator | list[torch.Generator] | None
                        ) -> Callable[[torch.Tensor, torch.Tensor], Any]:
        """One step of the loop, `(x_t, t) -> scheduler output holding x_{t-1}`, as fast as `fast_sampling` allows."""
        # Deterministic schedulers (PNDM, ...) take no generator argument.
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        predict = self._predict
        if self._compiled_unet is not None:
            # The compiled UNet holds the weights as constants: recompile if they changed since the last call.
            weights = tuple((tensor.data_ptr(), tensor._version) for tensor in self.unet.state_dict().values())
            if self._weights_seen is not None and weights != self._weights_seen:
                self._compiled_unet.invalidate()
            self._weights_seen = weights
            predict = self._compiled_unet

        # A UNet with learned variances predicts them in as many extra channels. A DDPM scheduler with a learned
        # variance_type samples with them; every other scheduler takes the prediction alone (diffusers' DPM-Solver
        # would cut the output at 3 channels, whatever the model's).
        keeps_variance = type(self.scheduler).__name__ == "DDPMScheduler" and getattr(
            self.scheduler.config, "variance_type", None) in ("learned", "learned_range")

        def denoise(sample: torch.Tensor, timestep: torch.Tensor) -> Any:
            model_output = predict(self.scheduler.scale_model_input(sample, timestep), timestep)
            if not keeps_variance and model_output.shape[1] == 2 * sample.shape[1]:
                model_output = model_output[:, : sample.shape[1]]
            return self.scheduler.step(model_output, timestep, sample, **step_kwargs)

        fast = self.fast_sampling
        if fast is not None and fast.use_cuda_graph(device, self.scheduler, generator):
            return CUDAGraphStep(denoise, generator if isinstance(generator, list) else [generator])
        return denoise

    def _predict(self, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction at (x_t, t), under the fast path's autocast, in the dtype of `model_input`."""
        if self.fast_sampling is None:
            return self.unet(model_input, timestep).sample
        with self.fast_sampling.autocast(model_input.device):
            return self.unet(model_input, timestep).sample.to(model_input.dtype)

    def postprocess(self, sample: torch.Tensor, output_type: OutputType = "pil"):
        """Maps a sample in [-1, 1] (B, C, H, W) to images in [0, 1] of the requested type."""
        images = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.float().cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
        return self.numpy_to_pil(images) if output_type == "pil" else images


def _is_drop_in(library: str | None, class_name: str | None) -> bool:
    """Whether a model_index entry names one of the classes ddpm_hf re-implements."""
    return library is not None and library.split(".")[0] in ("diffusers", "ddpm_hf") and class_name in DROP_IN_CLASSES


def _read_model_index(folder: str) -> dict[str, Any] | None:
    """The folder's model_index.json, or None for a flat model folder (config.json + scheduler_config.json)."""
    index_file = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_file):
        try:
            with open(index_file, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as error:
            raise OSError(f"{index_file} is not valid JSON ({error}); re-save or re-download the pipeline.") from error
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "scheduler_config.json")):
        return None
    raise OSError(
        f"{folder} is not a saved DDPM pipeline: expected model_index.json with unet/ and scheduler/ "
        "(diffusers' layout), or config.json, scheduler_config.json and the weights at the top level "
        "(the layout of google/ddpm-cifar10-32)."
    )


def _components(model_index: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    return {key: tuple(value) for key, value in model_index.items()
            if not key.startswith("_") and isinstance(value, list) and len(value) == 2}


def _model_kwargs(kwargs: dict[str, Any], component: str) -> dict[str, Any]:
    """The `DiffusionPipeline.from_pretrained` arguments for one model component, as diffusers passes them on."""
    keys = ("torch_dtype", "variant", "use_safetensors", "low_cpu_mem_usage", "device_map", "max_memory",
            "offload_folder", "offload_state_dict", "disable_mmap")
    model_kwargs = {key: kwargs[key] for key in keys if kwargs.get(key) is not None}
    if isinstance(model_kwargs.get("torch_dtype"), dict):  # {"unet": torch.float16, "default": ...}
        dtypes = model_kwargs["torch_dtype"]
        model_kwargs["torch_dtype"] = dtypes.get(component, dtypes.get("default", torch.float32))
    if model_kwargs.get("device_map") == "balanced":  # a pipeline-level strategy, applied after loading
        del model_kwargs["device_map"]
    return model_kwargs


def _load_component(folder: str, component: str, component_class: type, kwargs: dict[str, Any]):
    """Loads one drop-in component from its subfolder, or from the root in the flat layout."""
    path = os.path.join(folder, component)
    path = path if os.path.isdir(path) else folder
    if issubclass(component_class, SchedulerMixin):
        return component_class.from_pretrained(path)
    return component_class.from_pretrained(path, **_model_kwargs(kwargs, component))
