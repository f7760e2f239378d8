"""The opt-in fast paths of `DDPMPipeline`'s denoising loop: autocast, channels_last, torch.compile, CUDA graphs.

Each is a small piece the pipeline composes around its step `(sample, timestep) -> scheduler output`:
`FastSampling` holds and checks the settings, `CompiledOrEager` compiles the UNet call and falls back to eager
where compiling fails, and `CUDAGraphStep` replays the whole step from one captured CUDA graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch._inductor.config

from ..schedulers import DDPMScheduler

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FastSampling:
    """Settings of the fast sampling path; see [`DDPMPipeline.enable_fast_sampling`]."""

    dtype: torch.dtype | None = torch.bfloat16  # autocast dtype of the UNet; None runs it in its weights' dtype
    channels_last: bool = True  # NHWC activations and weights: the layout oneDNN and cuDNN convolve fastest
    compile: bool = True  # torch.compile the UNet call (static shapes, one graph), eager where that fails
    cuda_graph: bool | None = None  # replay each step from a CUDA graph; None: wherever it can (CUDA, CUDA RNG)

    def __post_init__(self):
        if self.dtype not in (None, torch.float32, *AUTOCAST_DTYPES):
            raise ValueError(f"dtype must be torch.bfloat16, torch.float16, or None (or torch.float32) for no "
                             f"autocast; got {self.dtype!r}.")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be True, False or None (where possible), got {self.cuda_graph!r}.")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device):
        """Autocast to `dtype` on `device`, or nothing."""
        if self.dtype in AUTOCAST_DTYPES:
            return torch.autocast(device.type, dtype=self.dtype)
        return nullcontext()

    def use_cuda_graph(self, device: torch.device, scheduler: Any, generator: Any) -> bool:
        """Whether this call can replay its steps from a CUDA graph; a `ValueError` if `cuda_graph=True` asks for
        one that cannot be."""
        generators = generator if isinstance(generator, list) else [generator]
        reasons = []
        if device.type != "cuda":
            reasons.append(f"the pipeline runs on {device.type}, not CUDA")
        if not isinstance(scheduler, DDPMScheduler):
            # Other schedulers keep per-step state in Python (a step index, past model outputs) that a replayed
            # graph would not advance.
            reasons.append(f"the scheduler is a {type(scheduler).__name__}, not ddpm_hf's DDPMScheduler")
        if any(g is not None and g.device.type != "cuda" for g in generators):
            reasons.append("the noise is drawn on the CPU (pass torch.Generator('cuda') generators, or none)")
        if self.cuda_graph and reasons:
            raise ValueError(f"cuda_graph=True, but {'; '.join(reasons)}. Use cuda_graph=None to capture only where "
                             "possible.")
        return self.cuda_graph is not False and not reasons


class CompiledOrEager:
    """`torch.compile(function)` for inference, falling back for good to `function` itself, with one warning, if
    compiling fails (no C++ compiler, an unsupported platform, a graph break).

    One graph (`fullgraph`), static shapes, and inductor's freezing: parameters become constants of the compiled
    graph, so their autocast copies are made once and oneDNN packs the convolution weights once (on CPU, the largest
    gain after bf16 itself). Freezing is switched on around each call, not only for the compiler, so that dynamo also
    guards on the identity of the parameters. A frozen graph does not see in-place changes to the weights: callers
    must `invalidate()` it after such changes.
    """

    def __init__(self, function: Callable[..., torch.Tensor]):
        self.function = function
        self.compiled = None
        try:
            self.compiled = torch.compile(function, fullgraph=True, dynamic=False)
        except Exception as error:  # torch.compile itself refuses on some platforms and Python versions
            self._fall_back(error)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is None:
            return self.function(*args, **kwargs)
        try:
            with torch._inductor.config.patch(freezing=True):
                return self.compiled(*args, **kwargs)
        except Exception as error:
            output = self.function(*args, **kwargs)  # bad inputs raise their own error here, from eager code
            self._fall_back(error)
            return output

    def invalidate(self) -> None:
        """Drops the compiled graphs of `function` (for every instance of its class), to be recompiled on next call."""
        torch._dynamo.reset_code(self.function.__code__)

    def _fall_back(self, error: Exception) -> None:
        self.compiled = None
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"torch.compile failed ({type(error).__name__}: {message}); sampling continues in eager "
                      "mode. Pass compile=False to enable_fast_sampling to skip compiling.", RuntimeWarning,
                      stacklevel=3)


class CUDAGraphStep:
    """Runs `step(sample, timestep)` eagerly for `warmup_steps` calls, then captures it in a CUDA graph and replays
    that graph for every later call.

    The graph reads static input buffers and writes static outputs: each call copies its inputs in and returns
    clones of the outputs, so callers see ordinary tensors. The step must not synchronise with the host (ddpm_hf's
    UNet and DDPMScheduler do not) and its timestep must already be on the GPU. Noise drawn inside the graph comes
    from the default CUDA generator or from `generators`, which are registered with the graph so that each replay
    advances them as an eager step would.
    """

    warmup_steps = 2  # eager steps first, on a side stream: cuDNN/cuBLAS heuristics and the compiler run there

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], Any], generators: Sequence[torch.Generator]):
        self.step = step
        self.generators = [g for g in generators if g is not None]
        self.calls = 0
        self.graph = None
        self.failed = False

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor) -> Any:
        self.calls += 1
        if self.failed or self.calls <= self.warmup_steps:
            return self._on_side_stream(sample, timestep)
        if self.graph is None:
            try:
                self._capture(sample, timestep)
            except Exception as error:  # e.g. a host sync in the step; sampling goes on eagerly
                self.failed = True
                warnings.warn(f"CUDA graph capture failed ({type(error).__name__}: {error}); sampling continues "
                              "without a graph.", RuntimeWarning, stacklevel=2)
                return self.step(sample, timestep)
        self.static_sample.copy_(sample)
        self.static_timestep.copy_(timestep)
        self.graph.replay()
        return type(self.static_output)(**{name: value.clone() for name, value in self.static_output.items()})

    def _on_side_stream(self, sample: torch.Tensor, timestep: torch.Tensor) -> Any:
        side = torch.cuda.Stream(sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side):
            output = self.step(sample, timestep)
        torch.cuda.current_stream(sample.device).wait_stream(side)
        return output

    def _capture(self, sample: torch.Tensor, timestep: torch.Tensor) -> None:
        self.static_sample, self.static_timestep = sample.clone(), timestep.clone()
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.static_output = self.step(self.static_sample, self.static_timestep)
        self.graph = graph
