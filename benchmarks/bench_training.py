"""Training speed: one optimizer step of ddpm_hf's training loop against the diffusers-style step, side by side.

    python benchmarks/bench_training.py --quick            # a few minutes on a CPU
    python benchmarks/bench_training.py --threads 1        # the README's CPU table (a shared CPU)
    python benchmarks/bench_training.py --configs cifar10-32px --batch_size 128   # on a GPU

ddpm_hf: the loop's own `build` and `optimizer_step` (ddpm_hf.training.loop): Accelerate, the step's noise and
timesteps from a per-step generator, the loss in float32, gradient clipping, AdamW (fused on CUDA), the LR
schedule; EMA off on both sides. diffusers-style: the body of diffusers' examples/unconditional_image_generation/
train_unconditional.py (diffusers' UNet2DModel and DDPMScheduler, AdamW, Accelerate), without its EMA and without
its per-step `loss.item()` (which would only slow diffusers' side down on a GPU). Both start from the same weights
(diffusers' UNet loads ddpm_hf's state dict) and use the same optimiser settings, batch and images.

    fp32-eager  both in float32, eager.
    best        --mixed_precision on both sides (Accelerate's autocast; default bf16 on CUDA, none on a CPU, where
                bf16 autocast slows training down); ddpm_hf with the loop's --channels_last and --torch_compile
                (compile skipped under --quick on a CPU). diffusers-style: as the example runs it, and also with
                channels_last, torch.compile (where ddpm_hf compiles) and fused AdamW on CUDA; the ratio is
                against whichever diffusers-style step was faster in each round.

The fp32 row also reports the largest difference between the two UNets' predictions on the benchmark batch before
training (must stay within 1e-4). Images/s = batch size x steps per call / median seconds per call.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler

from common import (CONFIGS, BenchConfig, Clock, add_common_args, environment, interleave, peak_memory_mib, peak_tflops,
                    pick_batch_size, print_profile, report, setup, speedup, unet_flops)

from ddpm_hf.training import DataConfig, TrainData, TrainingConfig
from ddpm_hf.training.loop import Run, build, make_accelerator, optimizer_step

MAX_FP32_DIFFERENCE = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, help="Optimizer steps per timed call (default: 2 on CPU, 20 on CUDA).")
    parser.add_argument("--modes", nargs="+", choices=("fp32-eager", "best"),
                        help="Default: both; with --quick on a CPU, best for the first config only.")
    parser.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"),
                        help="Autocast of the best mode (default: bf16 on CUDA, no on a CPU).")
    return parser.parse_args()


def ddpm_hf_step(config: BenchConfig, images: torch.Tensor, mixed_precision: str, channels_last: bool,
                 compile: bool, output_dir: str, allow_tf32: bool = False) -> tuple[Run, Callable[[], Any]]:
    """The training loop's Run (model, scheduler, optimizer, LR schedule, Accelerator) and one optimizer step."""
    training = TrainingConfig(
        data=DataConfig(resolution=images.shape[-1]),
        train_batch_size=images.shape[0],
        mixed_precision=mixed_precision,
        channels_last=channels_last,
        torch_compile=compile,
        allow_tf32=allow_tf32,
        use_ema=False,
        logger="none",
        output_dir=output_dir,
    )
    dataset = torch.utils.data.TensorDataset(images)
    data = TrainData(dataset=dataset, num_channels=images.shape[1], num_examples=len(images), name="random")
    run = build(training, make_accelerator(training), data, dict(config.unet), max_train_steps=10**6)
    batches = itertools.repeat(images)
    return run, lambda: optimizer_step(run, batches)


def diffusers_step(run: Run, images: torch.Tensor, channels_last: bool, compile: bool,
                   fused_adamw: bool | None = None) -> Callable[[], Any]:
    """train_unconditional.py's step on diffusers' UNet, holding the weights `run`'s UNet starts from.

    `fused_adamw` defaults to fusing on CUDA when compiling (the example itself never fuses)."""
    training, device = run.config, run.accelerator.device
    accelerator = Accelerator(mixed_precision=training.mixed_precision)  # shares the Accelerate state with `run`
    unet = diffusers.UNet2DModel.from_config(run.unet.config)
    unet.load_state_dict(run.unet.state_dict(), strict=True)
    noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=training.ddpm_num_steps,
                                              beta_schedule=training.ddpm_beta_schedule)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=training.learning_rate,
                                  betas=(training.adam_beta1, training.adam_beta2),
                                  weight_decay=training.adam_weight_decay, eps=training.adam_epsilon,
                                  fused=(compile if fused_adamw is None else fused_adamw) and device.type == "cuda")
    lr_scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.lr_warmup_steps,
                                 num_training_steps=run.max_train_steps)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if compile:
        model = torch.compile(model)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    def step():
        clean_images = images.to(device, weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                  device=device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

    return step


def prediction_difference(run: Run, images: torch.Tensor) -> float:
    """Largest difference between the two UNets' predictions at fp32, same weights and inputs (dropout off)."""
    theirs = diffusers.UNet2DModel.from_config(run.unet.config).to(images.device)
    theirs.load_state_dict(run.unet.state_dict(), strict=True)
    timesteps = torch.linspace(0, 999, images.shape[0], device=images.device).long()
    with torch.no_grad():
        ours_output = run.unet.eval()(images, timesteps).sample
        their_output = theirs.eval()(images, timesteps).sample
    run.unet.train()
    return (ours_output - their_output).abs().max().item()


def run_mode(mode: str, config: BenchConfig, images: torch.Tensor, steps: int, rounds: int, quick: bool,
             clock: Clock, mixed_precision: str, flops_per_image: float, peak: float | None,
             profile: bool) -> dict[str, Any]:
    device = images.device
    AcceleratorState._reset_state(reset_partial_state=True)  # each mode sets its own mixed precision
    torch._dynamo.reset()
    best = mode == "best"
    compile_here = best and not (quick and device.type == "cpu")
    with tempfile.TemporaryDirectory() as output_dir:
        started = time.perf_counter()
        run, ours = ddpm_hf_step(config, images, mixed_precision if best else "no", best, compile_here, output_dir)
        build_s = time.perf_counter() - started
        difference = prediction_difference(run, images) if not best else None
        contenders = {"ddpm_hf": ours, "diffusers": diffusers_step(run, images, channels_last=False, compile=False)}
        if best:
            contenders["diffusers-fast"] = diffusers_step(run, images, channels_last=True, compile=compile_here)
        calls = {name: (lambda step=step: [step() for _ in range(steps)]) for name, step in contenders.items()}
        timings = interleave(calls, rounds, clock)
        their_names = [name for name in contenders if name != "ddpm_hf"]
        fastest_theirs = min(their_names, key=lambda name: timings[name].median_s)
        if profile:
            for name in ("ddpm_hf", fastest_theirs):
                print_profile(f"{config.name} {mode} {name}, {steps} training steps:", calls[name], device)
        images_per_call = images.shape[0] * steps
        row = {
            "config": config.name,
            "mode": mode,
            "autocast": mixed_precision if best else "no",
            "batch_size": images.shape[0],
            "steps": steps,
            "ddpm_hf_images_per_s": images_per_call / timings["ddpm_hf"].median_s,
            "diffusers_images_per_s": images_per_call / timings[fastest_theirs].median_s,
            "speedup": speedup(timings, "ddpm_hf", *their_names),
            "diffusers_contender": fastest_theirs,
            "ddpm_hf_peak_mib": peak_memory_mib(calls["ddpm_hf"], device),
            "diffusers_peak_mib": peak_memory_mib(calls[fastest_theirs], device),
            "max_abs_diff": difference,
            # The loop compiles in `build` (one traced forward and backward); diffusers' side on its first call.
            "ddpm_hf_compile_s": timings["ddpm_hf"].compile_s + (build_s if compile_here else 0.0),
            "diffusers_compile_s": timings[fastest_theirs].compile_s,
        }
    for side in ("ddpm_hf", "diffusers"):
        tflops = row[f"{side}_images_per_s"] * flops_per_image / 1e12
        row[f"{side}_tflops"] = tflops
        row[f"{side}_mfu"] = tflops / peak if peak and mixed_precision != "no" and best else None
    return row


def main() -> int:
    args = parse_args()
    clock = setup(args)
    device = clock.device
    on_cuda = device.type == "cuda"
    peak = peak_tflops(args, device)
    steps = args.steps or (20 if on_cuda else 2)
    mixed_precision = args.mixed_precision or ("bf16" if on_cuda else "no")
    rows = []
    for index, name in enumerate(args.configs):
        config = CONFIGS[name]
        batch_size = pick_batch_size(args, config, device, cuda_default=128)
        size = config.unet["sample_size"]
        images = torch.rand(batch_size, config.unet["in_channels"], size, size,
                            generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
        reference_unet = diffusers.UNet2DModel(**config.unet).to(device)
        flops_per_image = unet_flops(reference_unet, images, backward=True) / batch_size
        modes = args.modes or (["fp32-eager"] if args.quick and not on_cuda and index > 0 else ["fp32-eager", "best"])
        for mode in modes:
            rows.append(run_mode(mode, config, images, steps, args.rounds, args.quick, clock, mixed_precision,
                                 flops_per_image, peak, args.profile))
            print(rows[-1], file=sys.stderr, flush=True)

    columns = {"config": "config", "mode": "mode", "autocast": "autocast", "batch_size": "batch", "steps": "steps/call",
               "ddpm_hf_images_per_s": "ddpm_hf img/s", "diffusers_images_per_s": "diffusers img/s",
               "speedup": "speedup", "ddpm_hf_peak_mib": "ddpm_hf peak MiB", "diffusers_peak_mib": "diffusers peak MiB",
               "max_abs_diff": "max abs diff", "ddpm_hf_compile_s": "ddpm_hf warm-up s",
               "diffusers_compile_s": "diffusers warm-up s", "ddpm_hf_tflops": "ddpm_hf TFLOP/s",
               "diffusers_tflops": "diffusers TFLOP/s"}
    if peak:
        columns |= {"ddpm_hf_mfu": "ddpm_hf MFU", "diffusers_mfu": "diffusers MFU"}
    report("Training step: ddpm_hf loop vs diffusers train_unconditional", rows, columns, environment(clock),
           args.json)

    mismatched = [row for row in rows if row["max_abs_diff"] is not None and row["max_abs_diff"] > MAX_FP32_DIFFERENCE]
    for row in mismatched:
        print(f"FAIL: {row['config']}: the UNets' predictions differ by {row['max_abs_diff']:.2e}.", file=sys.stderr)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
