"""Sampling speed: ddpm_hf's DDPMPipeline against diffusers' DDPMPipeline, same weights, side by side.

    python benchmarks/bench_sampling.py --quick                  # a few minutes on a CPU
    python benchmarks/bench_sampling.py --threads 1              # the README's CPU table (a shared CPU)
    python benchmarks/bench_sampling.py --configs cifar10-32px   # on a GPU: batch 256, 1000 steps

Both pipelines get the same UNet weights (diffusers' UNet is loaded from ddpm_hf's state dict), the same scheduler
config, batch size, step count and device. Modes, each a group of pipelines timed interleaved (see common.py):

    fp32-eager     both pipelines as they come.
    fp32-compiled  ddpm_hf: `enable_fast_sampling(dtype=None)` (channels_last, torch.compile with freezing, and on
                   CUDA a captured step). diffusers: channels_last and `torch.compile(unet, fullgraph=True)`, as
                   its docs show (on CUDA with mode="reduce-overhead": CUDA graphs of the UNet). Same numbers as
                   fp32-eager, so the images are compared too.
    best           ddpm_hf: `enable_fast_sampling()` (bf16 autocast on CPU, fp16 on CUDA). diffusers: its
                   documented fast mode, the UNet in that dtype (`torch_dtype`), channels_last, torch.compile; and,
                   unless --quick, its fp32-compiled pipeline too, the ratio being taken against whichever diffusers
                   pipeline was faster in each round.

The fp32 modes check that both sides compute the same images: the largest difference per pixel (images in [0, 1])
must stay within 1e-4, else the script exits with status 1. Images/s = batch size / median seconds per call.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from typing import Any

import diffusers
import torch

from common import (CONFIGS, BenchConfig, Clock, add_common_args, environment, interleave, peak_memory_mib, peak_tflops,
                    pick_batch_size, print_profile, report, setup, speedup, twin_unets, unet_flops)

from ddpm_hf import DDPMPipeline, DDPMScheduler

MAX_FP32_DIFFERENCE = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, help="Denoising steps per call (default: per config; 1000 on CUDA).")
    parser.add_argument("--modes", nargs="+", choices=("fp32-eager", "fp32-compiled", "best"),
                        help="Default: all three; with --quick on a CPU, fp32-eager everywhere and best for the "
                             "first config only (compiling takes minutes on a CPU).")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"),
                        help="Low precision of the best mode (default: bfloat16 on CPU, float16 on CUDA).")
    return parser.parse_args()


class Contenders:
    """The pipelines of one config, built on first use, each with its own copy of the same weights."""

    def __init__(self, config: BenchConfig, device: torch.device, low_dtype: torch.dtype, compile: bool = True):
        self.device, self.low_dtype, self.compile = device, low_dtype, compile
        self.ours_unet, self.theirs_unet = twin_unets(config.unet)
        self.pipelines: dict[str, Any] = {}
        self.compile_s: dict[str, float] = {}  # from each pipeline's first warm-up call

    def get(self, name: str):
        if name not in self.pipelines:
            self.pipelines[name] = getattr(self, name.replace("-", "_"))()
        return self.pipelines[name]

    def ours(self, **fast: Any) -> DDPMPipeline:
        pipe = DDPMPipeline(unet=copy.deepcopy(self.ours_unet).eval(), scheduler=DDPMScheduler()).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if fast:
            pipe.enable_fast_sampling(**fast)
        return pipe

    def theirs(self, dtype: torch.dtype = torch.float32, fast: bool = False, compile_mode: str | None = None
               ) -> diffusers.DDPMPipeline:
        unet = copy.deepcopy(self.theirs_unet).eval().to(self.device)
        if dtype != torch.float32:
            unet.to(dtype)
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
        pipe.set_progress_bar_config(disable=True)
        if fast:  # diffusers' documented recipe (docs: "Accelerate inference", "torch.compile")
            pipe.unet.to(memory_format=torch.channels_last)
            if self.compile:
                # On GPUs the docs compile with mode="reduce-overhead", which adds CUDA graphs for the UNet.
                compile_mode = compile_mode or ("reduce-overhead" if self.device.type == "cuda" else None)
                pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True, dynamic=False)
        return pipe

    def ddpm_hf_fp32_eager(self):
        return self.ours()

    def diffusers_fp32_eager(self):
        return self.theirs()

    def ddpm_hf_fp32_compiled(self):
        return self.ours(dtype=None, compile=self.compile)

    def diffusers_fp32_compiled(self):
        return self.theirs(fast=True)

    def ddpm_hf_best(self):
        return self.ours(dtype=self.low_dtype, compile=self.compile)

    def diffusers_best(self):
        return self.theirs(self.low_dtype, fast=True)

    def diffusers_max_autotune(self):
        return self.theirs(self.low_dtype, fast=True, compile_mode="max-autotune")


MODES = {  # mode -> (ddpm_hf pipeline, diffusers pipelines)
    "fp32-eager": ("ddpm_hf-fp32-eager", ("diffusers-fp32-eager",)),
    "fp32-compiled": ("ddpm_hf-fp32-compiled", ("diffusers-fp32-compiled",)),
    "best": ("ddpm_hf-best", ("diffusers-best", "diffusers-fp32-compiled")),
}


def sampler(pipe, batch_size: int, steps: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """One full pipeline call, seeded, returning the images as a float32 (B, C, H, W) tensor in [0, 1]."""
    def sample() -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        images = pipe(batch_size=batch_size, num_inference_steps=steps, generator=generator, output_type="pt").images
        return images.float()
    return sample


def run_mode(mode: str, contenders: Contenders, config: BenchConfig, batch_size: int, steps: int, rounds: int,
             quick: bool, clock: Clock, flops_per_image: float, peak: float | None, profile: bool) -> dict[str, Any]:
    ours_name, their_names = MODES[mode]
    if quick:
        their_names = their_names[:1]
    device = contenders.device
    samplers = {name: sampler(contenders.get(name), batch_size, steps, device) for name in (ours_name, *their_names)}
    timings = interleave(samplers, rounds, clock)
    for name, timing in timings.items():
        contenders.compile_s.setdefault(name, timing.compile_s)
    reference = sampler(contenders.get("diffusers-fp32-eager"), batch_size, steps, device)()
    ours_images, their_images = samplers[ours_name](), samplers[their_names[0]]()
    fastest_theirs = min(their_names, key=lambda name: timings[name].median_s)
    if profile:
        for name in (ours_name, fastest_theirs):
            print_profile(f"{config.name} {name}, one call of {steps} steps:", samplers[name], device)
    row = {
        "config": config.name,
        "mode": mode,
        "batch_size": batch_size,
        "steps": steps,
        "ddpm_hf_images_per_s": batch_size / timings[ours_name].median_s,
        "diffusers_images_per_s": batch_size / timings[fastest_theirs].median_s,
        "speedup": speedup(timings, ours_name, *their_names),
        "diffusers_contender": fastest_theirs,
        "ddpm_hf_peak_mib": peak_memory_mib(samplers[ours_name], device),
        "diffusers_peak_mib": peak_memory_mib(samplers[fastest_theirs], device),
        "max_abs_diff": (ours_images - their_images).abs().max().item(),
        "ddpm_hf_drift": (ours_images - reference).abs().max().item(),
        "diffusers_drift": (their_images - reference).abs().max().item(),
        "ddpm_hf_compile_s": contenders.compile_s[ours_name],
        "diffusers_compile_s": contenders.compile_s[fastest_theirs],
    }
    for side in ("ddpm_hf", "diffusers"):  # achieved UNet FLOP/s; utilisation of the low-precision peak
        row[f"{side}_tflops"] = row[f"{side}_images_per_s"] * steps * flops_per_image / 1e12
        row[f"{side}_mfu"] = row[f"{side}_tflops"] / peak if peak and mode == "best" else None
    return row


def default_modes(args: argparse.Namespace, device: torch.device, config_index: int) -> list[str]:
    if args.modes:
        return args.modes
    if args.quick and device.type == "cpu":
        return ["fp32-eager", "best"] if config_index == 0 else ["fp32-eager"]
    return list(MODES)


def main() -> int:
    args = parse_args()
    clock = setup(args)
    device = clock.device
    on_cuda = device.type == "cuda"
    low_dtype = getattr(torch, args.dtype or ("float16" if on_cuda else "bfloat16"))
    rows = []
    for index, name in enumerate(args.configs):
        config = CONFIGS[name]
        batch = pick_batch_size(args, config, device, cuda_default=256)
        steps = args.steps or (100 if on_cuda and args.quick else 1000 if on_cuda else
                               config.quick_sampling_steps if args.quick else config.sampling_steps)
        torch._dynamo.reset()  # each config compiles afresh, with static shapes
        contenders = Contenders(config, device, low_dtype)
        size = config.unet["sample_size"]
        example = torch.zeros(batch, config.unet["in_channels"], size, size, device=device)
        flops_per_image = unet_flops(contenders.theirs_unet.to(device), example) / batch
        for mode in default_modes(args, device, index):
            rows.append(run_mode(mode, contenders, config, batch, steps, args.rounds, args.quick, clock,
                                 flops_per_image, peak_tflops(args, device), args.profile))
            print(rows[-1], file=sys.stderr, flush=True)

    columns = {"config": "config", "mode": "mode", "batch_size": "batch", "steps": "steps",
               "ddpm_hf_images_per_s": "ddpm_hf img/s", "diffusers_images_per_s": "diffusers img/s",
               "speedup": "speedup", "ddpm_hf_peak_mib": "ddpm_hf peak MiB", "diffusers_peak_mib": "diffusers peak MiB",
               "max_abs_diff": "max abs diff", "ddpm_hf_compile_s": "ddpm_hf warm-up s",
               "diffusers_compile_s": "diffusers warm-up s", "ddpm_hf_tflops": "ddpm_hf TFLOP/s",
               "diffusers_tflops": "diffusers TFLOP/s"}
    if peak_tflops(args, device):
        columns |= {"ddpm_hf_mfu": "ddpm_hf MFU", "diffusers_mfu": "diffusers MFU"}
    report("Sampling: ddpm_hf DDPMPipeline vs diffusers DDPMPipeline", rows, columns, environment(clock), args.json)

    mismatched = [row for row in rows if row["mode"].startswith("fp32") and row["max_abs_diff"] > MAX_FP32_DIFFERENCE]
    for row in mismatched:
        print(f"FAIL: {row['config']} {row['mode']}: images differ by {row['max_abs_diff']:.2e} > "
              f"{MAX_FP32_DIFFERENCE:g}; the two sides do not compute the same thing.", file=sys.stderr)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
