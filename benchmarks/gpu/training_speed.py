"""Part 4: training speed of the CIFAR-10 network, the real ddpm_hf step against a diffusers train_unconditional step.

ddpm_hf: the step `examples/train.py` runs (`ddpm_hf.training.loop.build` and `optimizer_step`, through Accelerate:
per-step generator, float32 loss, clipping, fused AdamW on CUDA, the LR schedule; EMA off). diffusers-style: the body
of diffusers' examples/unconditional_image_generation/train_unconditional.py (benchmarks/bench_training.py), given
the same options: the same Accelerate mixed precision, TF32 and torch.compile settings, and fused AdamW on CUDA (which
the example does not use, but a careful user would). Modes: fp32+TF32, bf16 (Accelerate autocast), bf16+compile.
Both start from the same weights and train on the same batch. MFU = fwd+bwd FLOPs (torch.utils.flop_counter) per
second / measured bf16 matmul rate.
"""

from __future__ import annotations

import tempfile

import diffusers
import torch
from accelerate.state import AcceleratorState

from bench_training import ddpm_hf_step, diffusers_step
from common import CONFIGS, Clock, speedup, time_rounds, unet_flops, warm_up
from context import PartContext, release_device_memory

MODES = {  # name -> (mixed precision, TF32 matmuls, torch.compile)
    "bf16": ("bf16", False, False),
    "bf16+compile": ("bf16", False, True),
    "fp32+tf32": ("no", True, False),
}
FIRST_COMPILE_GUESS_S = 150.0  # forward and backward of both UNets, until this run has compiled once


def run(ctx: PartContext) -> None:
    smoke = ctx.smoke
    config = CONFIGS["micro-8px" if smoke else "cifar10-32px"]
    steps = 2 if smoke else 10  # optimizer steps per timed call
    # The targets' row first, so that a tight budget drops the others.
    plan = [(256, "bf16"), (256, "bf16+compile"), (256, "fp32+tf32"), (128, "bf16"), (128, "fp32+tf32"),
            (128, "bf16+compile")]
    if smoke:
        plan = [(4, "bf16"), (4, "fp32+tf32"), (8, "bf16")]
        ctx.skip("bf16+compile", "--smoke: compiling takes minutes on a CPU")
    estimates = {"compile": FIRST_COMPILE_GUESS_S, "eager": 30.0 if not smoke else 10.0}
    for batch, mode in plan:
        compiled = MODES[mode][2]
        with ctx.task(f"training batch {batch} {mode}", estimates["compile" if compiled else "eager"]) as go:
            if go:
                seconds = time_mode(ctx, config, batch, mode, steps)
                estimates["compile" if compiled else "eager"] = seconds * 1.2
        torch._dynamo.reset()
        release_device_memory(ctx.device)


def time_mode(ctx: PartContext, config, batch: int, mode: str, steps: int) -> float:
    """Times one (batch, mode) row, records it and returns how long the whole row took."""
    import time

    started = time.monotonic()
    device, clock = ctx.device, Clock(ctx.device)
    mixed_precision, allow_tf32, compile = MODES[mode]
    AcceleratorState._reset_state(reset_partial_state=True)  # each mode sets its own mixed precision
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")  # the same for both sides
    size = config.unet["sample_size"]
    images = torch.rand(batch, config.unet["in_channels"], size, size,
                        generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    flops_per_image = unet_flops(diffusers.UNet2DModel(**config.unet).to(device), images, backward=True) / batch
    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as output_dir:
        run, ours = ddpm_hf_step(config, images, mixed_precision, channels_last=False, compile=compile,
                                 output_dir=output_dir, allow_tf32=allow_tf32)
        build_s = time.monotonic() - started  # includes the traced forward and backward when compiling
        theirs = diffusers_step(run, images, channels_last=False, compile=compile, fused_adamw=True)
        fused = run.optimizer.optimizer.defaults.get("fused")
        calls = {name: (lambda step=step: [step() for _ in range(steps)]) for name, step in
                 (("ddpm_hf", ours), ("diffusers", theirs))}
        timings = {name: warm_up(call, clock) for name, call in calls.items()}
        rounds = 3 if ctx.budget.allows(6 * max(t.first_call_s for t in timings.values()) + 5) else 1
        time_rounds(calls, timings, rounds, clock)
    peak = ctx.peak_tflops
    row = {"batch": batch, "mode": mode, "steps_per_call": steps, "rounds": rounds, "fused_adamw": fused,
           "speedup": speedup(timings, "ddpm_hf", "diffusers")}
    for name, timing in timings.items():
        images_per_s = batch * steps / timing.median_s
        tflops = images_per_s * flops_per_image / 1e12
        row |= {f"{name}_images_per_s": images_per_s, f"{name}_tflops": tflops,
                f"{name}_mfu": tflops / peak if peak else None,
                f"{name}_compile_s": timing.compile_s + (build_s if name == "ddpm_hf" and compile else 0.0)}
    ctx.record("training", **row)
    torch.set_float32_matmul_precision("highest")
    return time.monotonic() - started
