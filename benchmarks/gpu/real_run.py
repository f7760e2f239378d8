"""Part 5: a real short run through the command lines: train, stop, resume, sample, load in diffusers.

`examples/train.py` on a generated folder of 32 px RGB images with `--mixed_precision bf16 --model_config
ddpm-cifar10`; SIGTERM after ~40 s of training (a checkpoint, exit 0), `--resume_from_checkpoint latest` for a few
more steps (the pipeline and samples.png), `ddpm-hf sample` from the saved pipeline, and the folder loaded and sampled
by plain `diffusers.DDPMPipeline`. Checks: every exit code 0, the loss falls, the outputs exist and load.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from context import PartContext

REPO = Path(__file__).resolve().parents[2]


def run(ctx: PartContext) -> None:
    smoke = ctx.smoke
    data_dir = make_image_folder(ctx.work_dir / "images", count=32 if smoke else 512, size=8 if smoke else 32)
    output_dir = ctx.work_dir / "run"
    train_s = 8 if smoke else 40
    flags = ["--train_data_dir", str(data_dir), "--resolution", "8" if smoke else "32", "--mixed_precision", "bf16",
             "--model_config", "micro" if smoke else "ddpm-cifar10", "--train_batch_size", "8" if smoke else "128",
             "--random_flip", "--learning_rate", "2e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
             "--logging_steps", "5", "--checkpointing_steps", "100000", "--save_images_steps", "100000",
             "--ddpm_num_inference_steps", "20", "--eval_batch_size", "4", "--output_dir", str(output_dir)]
    checks: dict[str, object] = {}

    first = train(flags + ["--max_train_steps", "100000"], stop_after_s=train_s, budget_s=ctx.budget.left() - 30)
    checks["stopped_run_exit_code"] = first.returncode
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    checks["checkpoint"] = checkpoints[-1].name if checkpoints else None
    if not checkpoints:
        ctx.record("real_run", ok=False, **checks, log_tail=first.stderr[-2000:])
        return
    stopped_at = int(checkpoints[-1].name.split("-")[1])

    resumed = train(flags + ["--max_train_steps", str(stopped_at + 10), "--resume_from_checkpoint", "latest"],
                    budget_s=ctx.budget.left() - 20)
    checks["resumed_run_exit_code"] = resumed.returncode
    checks["samples_png"] = (output_dir / "samples.png").is_file()

    grid = ctx.work_dir / "cli_samples.png"
    cli = subprocess.run([sys.executable, "-m", "ddpm_hf.cli", "sample", str(output_dir), "--num-images", "4",
                          "--scheduler", "ddim", "--steps", "10", "--device", ctx.device.type, "--out", str(grid)],
                         cwd=REPO, capture_output=True, text=True, timeout=max(ctx.budget.left() - 10, 10), env=_env())
    checks["cli_sample_exit_code"] = cli.returncode
    checks["cli_grid"] = grid.is_file()
    checks["loads_in_diffusers"] = loads_in_diffusers(output_dir, ctx.device)
    losses = logged_losses(output_dir / "logs")
    checks |= {"steps": stopped_at + 10, "stopped_at": stopped_at, "logged_losses": len(losses),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    checks["loss_falls"] = len(losses) >= 2 and losses[-1] < losses[0]
    ok = (checks["stopped_run_exit_code"] == 0 and checks["resumed_run_exit_code"] == 0 and checks["samples_png"]
          and checks["cli_sample_exit_code"] == 0 and checks["loads_in_diffusers"] is True and checks["loss_falls"])
    tail = "" if ok else (first.stderr[-1000:] + resumed.stderr[-1000:] + cli.stderr[-500:])
    ctx.record("real_run", ok=ok, **checks, log_tail=tail)


def make_image_folder(folder: Path, count: int, size: int) -> Path:
    """`count` PNGs of coloured discs on smooth backgrounds: structure that a DDPM learns quickly (the loss falls)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        background = rng.uniform(0, 255, 3)[None, None] * (0.5 + 0.5 * x[..., None])
        cx, cy, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < radius**2)[..., None]
        image = np.where(disc, rng.uniform(0, 255, 3)[None, None], background)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{index:04d}.png")
    return folder


def train(flags: list[str], budget_s: float, stop_after_s: float | None = None, min_steps: int = 20
          ) -> subprocess.CompletedProcess:
    """Runs examples/train.py; with `stop_after_s`, sends SIGTERM that long after its progress bar first shows, or
    later, once it shows `min_steps` steps (on a busy machine 8 s may be 4 steps: too few to see the loss fall)."""
    process = subprocess.Popen([sys.executable, "examples/train.py", *flags], cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = bytearray()
    training_started = threading.Event()

    def read_output():  # tqdm redraws with "\r": read chunks, not lines
        while chunk := os.read(process.stdout.fileno(), 65536):
            output.extend(chunk)
            if b"Training:" in output[-70000:]:
                training_started.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    deadline = time.monotonic() + max(budget_s, 10)
    if stop_after_s is not None:
        if training_started.wait(timeout=max(deadline - time.monotonic(), 1)):
            time.sleep(min(stop_after_s, max(deadline - time.monotonic() - 15, 1)))
            while steps_shown(output) < min_steps and deadline - time.monotonic() > 15 and process.poll() is None:
                time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 5))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    reader.join(timeout=5)
    text = output.decode(errors="replace")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout=text, stderr=text)


def steps_shown(output: bytearray) -> int:
    """The step count of the newest progress-bar redraw ("Training:  3%|...| 31/1000 [...")."""
    counts = re.findall(rb"Training:[^\r\n]*?\| *(\d+)/\d+", bytes(output[-4000:]))
    return int(counts[-1]) if counts else 0


def loads_in_diffusers(folder: Path, device) -> bool | str:
    """Whether plain diffusers loads the saved pipeline and samples finite images with it."""
    try:
        import diffusers
        import torch

        pipe = diffusers.DDPMPipeline.from_pretrained(folder).to(device)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
        return bool(np.isfinite(images).all()) and images.shape[0] == 2 and isinstance(pipe.unet,
                                                                                        torch.nn.Module)
    except Exception as error:  # reported in the results, not raised: the other checks still count
        return f"{type(error).__name__}: {error}"


def logged_losses(log_dir: Path) -> list[float]:
    """The `loss` scalars of the run's TensorBoard logs, in step order (both the stopped and the resumed run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if "loss" in accumulator.Tags().get("scalars", []):
            points |= {event.step: event.value for event in accumulator.Scalars("loss")}
    return [points[step] for step in sorted(points)]


def _env() -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1"}
