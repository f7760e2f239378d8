"""Part 3: sampling speed of the paper's CIFAR-10 network (35.7M, 32 px), ddpm_hf against diffusers, side by side.

Per batch size, four pipelines with the same weights, timed in interleaved rounds (benchmarks/common.py):
ddpm_hf plain (fp32 eager), ddpm_hf `enable_fast_sampling(dtype=float16)` (channels_last, torch.compile with frozen
weights, the whole step replayed from one CUDA graph), diffusers eager (fp32) and diffusers in its documented fast
mode (the UNet in float16, channels_last, `torch.compile(unet, mode="reduce-overhead", fullgraph=True)`, which
replays the UNet from CUDA graphs; the scheduler step stays eager). A timed call runs 1,000 denoising steps at
batch 16 (where per-call costs such as ddpm_hf's graph capture matter) and 100 at batch 256 (scaled to 1,000 steps:
there the GPU's arithmetic dominates). The plain pipelines run at PyTorch's defaults (cuDNN convolutions in TF32);
their images are also compared in true float32 (TF32 off), the numerics target. Compile and capture time is the
warm-up call's excess over a timed call, reported apart. MFU = achieved UNet FLOP/s (torch.utils.flop_counter) /
measured bf16 matmul rate. With --max-autotune, diffusers' `mode="max-autotune"` is timed too, if the budget allows.
"""

from __future__ import annotations

import copy

import torch
import torch._dynamo.utils

from bench_sampling import Contenders, sampler
from common import CONFIGS, Clock, Timing, peak_memory_mib, speedup, time_rounds, unet_flops, warm_up
from context import PartContext, release_device_memory

OURS_PLAIN, OURS_FAST = "ddpm_hf-fp32-eager", "ddpm_hf-best"
THEIRS_PLAIN, THEIRS_FAST, THEIRS_AUTOTUNE = "diffusers-fp32-eager", "diffusers-best", "diffusers-max-autotune"
COMPILED = (OURS_FAST, THEIRS_FAST, THEIRS_AUTOTUNE)
FIRST_COMPILE_GUESS_S = 90.0  # until this run has compiled once (the CIFAR-10 UNet, 16 CPU cores compiling)


def run(ctx: PartContext, max_autotune: bool = False) -> None:
    smoke = ctx.smoke
    config = CONFIGS["micro-8px" if smoke else "cifar10-32px"]
    batches = {2: 3, 4: 3} if smoke else {16: 1000, 256: 100}  # batch -> denoising steps per timed call
    low_dtype = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16
    names = [OURS_PLAIN, THEIRS_PLAIN, OURS_FAST, THEIRS_FAST] + ([THEIRS_AUTOTUNE] if max_autotune else [])
    estimates = Estimates()
    for batch, steps in batches.items():
        with ctx.task(f"sampling batch {batch}") as go:
            if go:
                time_batch(ctx, config, batch, steps, low_dtype, names, estimates)
        torch._dynamo.reset()  # the next batch compiles afresh (static shapes); frees the graphs
        release_device_memory(ctx.device)


class Estimates:
    """What the next task will cost, from what this run has seen so far (for the budget checks)."""

    def __init__(self):
        self.compile_s = FIRST_COMPILE_GUESS_S
        self.call_s: dict[str, float] = {}

    def warm_up_s(self, name: str) -> float:
        return self.compile_s if name in COMPILED else 3 * self.call_s.get(name, 1.0)


def time_batch(ctx: PartContext, config, batch: int, steps: int, low_dtype: torch.dtype, names: list[str],
               estimates: Estimates) -> None:
    device, clock = ctx.device, Clock(ctx.device)
    contenders = Contenders(config, device, low_dtype, compile=not ctx.smoke)
    if ctx.smoke:
        ctx.skip(f"torch.compile at batch {batch}", "--smoke: compiling takes minutes on a CPU")
    size = config.unet["sample_size"]
    example = torch.zeros(batch, config.unet["in_channels"], size, size, device=device)
    flops_per_call = unet_flops(copy.deepcopy(contenders.theirs_unet).to(device), example) * steps

    calls, timings, skips = {}, {}, {}
    for name in names:
        with ctx.task(f"sampling batch {batch} {name}: warm-up", estimates.warm_up_s(name)) as go:
            if go:
                skips_before = _cudagraph_skips()
                calls[name] = last_output(sampler(contenders.get(name), batch, steps, device))
                timings[name] = warm_up(calls[name], clock)
                skips[name] = _cudagraph_skips() - skips_before
                if name in COMPILED and not ctx.smoke:
                    estimates.compile_s = max(timings[name].first_call_s * 1.2, 10.0)
                estimates.call_s[name] = timings[name].first_call_s if name not in COMPILED else 0.0

    # Rounds: each call is now about as long as its warm-up (compiled ones: guess from the eager ones / 2).
    per_round = sum(timings[name].first_call_s if name not in COMPILED else 1.0 for name in calls) + 1.0
    rounds = min(3, int(ctx.budget.left() * 0.6 // per_round))
    if rounds < 1:
        ctx.skip(f"sampling batch {batch}: timed rounds", "over budget after the warm-ups")
        return
    time_rounds(calls, timings, rounds, clock)
    for name, timing in timings.items():
        estimates.call_s[name] = timing.median_s

    fp32_difference = None
    if OURS_PLAIN in calls and THEIRS_PLAIN in calls and ctx.budget.allows(
            3 * (timings[OURS_PLAIN].median_s + timings[THEIRS_PLAIN].median_s)):
        torch.backends.cudnn.allow_tf32 = False  # the numerics target: float32 proper (matmuls are, by default)
        try:
            fp32_difference = (calls[OURS_PLAIN]() - calls[THEIRS_PLAIN]()).abs().max().item()
        finally:
            torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, which the timed calls ran with
    report_batch(ctx, batch, steps, calls, timings, skips, flops_per_call, rounds, fp32_difference)


def report_batch(ctx: PartContext, batch: int, steps: int, calls: dict, timings: dict[str, Timing],
                 skips: dict[str, int], flops_per_call: float, rounds: int, fp32_difference: float | None) -> None:
    peak = ctx.peak_tflops
    scale = 1000 / steps
    for name, timing in timings.items():
        memory = peak_memory_mib(calls[name], ctx.device) if ctx.budget.allows(timing.median_s + 5) else None
        achieved_tflops = flops_per_call / timing.median_s / 1e12
        ctx.record("sampling", batch=batch, contender=name, steps_timed=steps, rounds=rounds,
                   seconds_per_call=timing.median_s, images_per_s_1000_steps=batch / (timing.median_s * scale),
                   tflops=achieved_tflops, mfu=achieved_tflops / peak if peak else None, peak_mib=memory,
                   compile_s=timing.compile_s, cudagraph_skips=skips.get(name, 0))
    comparison = {"batch": batch}
    if OURS_FAST in timings and THEIRS_FAST in timings:
        theirs = [name for name in (THEIRS_FAST, THEIRS_AUTOTUNE) if name in timings]
        comparison["fast_speedup"] = speedup(timings, OURS_FAST, *theirs)
    if OURS_PLAIN in timings and THEIRS_PLAIN in timings:
        comparison["plain_speedup"] = speedup(timings, OURS_PLAIN, THEIRS_PLAIN)
        # Images in [0, 1], same CUDA generator seed: in float32 proper, and as timed (TF32 convolutions).
        comparison["fp32_max_abs_diff"] = fp32_difference
        comparison["tf32_max_abs_diff"] = (calls[OURS_PLAIN].output - calls[THEIRS_PLAIN].output).abs().max().item()
    for name in (OURS_FAST, THEIRS_FAST):
        if name in calls and OURS_PLAIN in calls:  # how far low precision moves the images (informational)
            comparison[f"{name}_drift"] = (calls[name].output - calls[OURS_PLAIN].output).abs().max().item()
    ctx.record("sampling_comparison", **comparison)


class last_output:
    """Wraps a sampling call and keeps its last images (to compare the contenders' outputs without extra calls)."""

    def __init__(self, function):
        self.function, self.output = function, None

    def __call__(self):
        self.output = self.function()
        return self.output


def _cudagraph_skips() -> int:
    """How often inductor has declined to replay a compiled graph from CUDA graphs (e.g. it has a CPU input)."""
    return torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
