"""examples/train.py as users run it: real subprocesses, real signals, a real 2-process `accelerate launch`."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_hf import DDPMPipeline

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
# The micro UNet on 64 embedded digits at 8 px: each step takes milliseconds.
QUICK = ["--model_config", "micro", "--resolution", "8", "--max_train_samples", "64", "--train_batch_size", "8",
         "--eval_batch_size", "4", "--ddpm_num_inference_steps", "5", "--logger", "none", "--no-eval_at_end"]
# One thread per process: an 8 px UNet gains nothing from more, and on a busy machine they wait on each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *QUICK, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path):
    output_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN), *QUICK, "--output_dir", str(output_dir), "--max_train_steps", "100000",
         "--checkpointing_steps", "5", "--save_images_steps", "100000"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (output_dir / "checkpoints" / "checkpoint-5").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr[-3000:]
    assert "Stopped by SIGTERM" in stderr
    latest = max((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    step = int(latest.name.split("-")[1])
    assert 5 <= step < 100000
    assert json.loads((latest / "train_state_0.json").read_text())["global_step"] == step
    assert not (output_dir / "model_index.json").exists()  # the run is unfinished: no pipeline yet

    resumed = run_train("--output_dir", str(output_dir), "--resume_from_checkpoint", "latest",
                        "--max_train_steps", str(step + 3), "--checkpointing_steps", "100000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {latest} at step {step}" in resumed.stderr
    assert DDPMPipeline.from_pretrained(output_dir).unet.config.sample_size == 8


def test_two_processes_train_one_model_together(tmp_path):
    output_dir = tmp_path / "run"
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(TRAIN), *QUICK, "--output_dir", str(output_dir), "--max_train_steps", "6",
               "--checkpointing_steps", "6", "--save_images_steps", "3", "--logger", "tensorboard",
               "--eval_every", "3", "--eval_num_samples", "8"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf_home")}  # the reference statistics' cache
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "for 6 steps of 16 images (2 process(es) x 8" in result.stderr  # global batch = 2 x 8

    # Both ranks ran to step 6 and hold identical weights and EMA; 64 images / 2 ranks / 8 = 4 batches an epoch.
    checkpoint = output_dir / "checkpoints" / "checkpoint-6"
    states = [json.loads((checkpoint / f"train_state_{rank}.json").read_text()) for rank in (0, 1)]
    progress = [(s["global_step"], s["epoch"], s["batches_in_epoch"], s["num_processes"]) for s in states]
    assert progress == [(6, 1, 2, 2), (6, 1, 2, 2)]
    assert states[0]["weights_sha256"] == states[1]["weights_sha256"]
    # The LR schedule counts optimizer steps, not steps x processes: 6 of the 100 warmup steps.
    events = EventAccumulator(str(output_dir / "logs" / "ddpm_hf"))
    events.Reload()
    assert [(event.step, round(event.value, 9)) for event in events.Scalars("lr")] == [(6, 2e-3 * 6 / 100)]

    # Only the main process wrote outputs: one log, one grid per sampling step, one pipeline.
    assert len(list((output_dir / "logs").rglob("events.out.tfevents*"))) == 2  # scalars+images, and hparams
    assert sorted(path.name for path in (output_dir / "samples").iterdir()) == ["step_000003.png"]
    assert [event.step for event in events.Scalars("eval/frechet_distance")] == [3, 6]  # the main process alone
    assert result.stderr.count("measuring sample quality on 8 images") == 2
    assert json.loads((output_dir / "eval_results.json").read_text())["num_samples"] == 8
    assert result.stderr.count("Saved the pipeline") == 1
    raw = load_file(output_dir / "unet_raw" / "diffusion_pytorch_model.safetensors")
    saved = load_file(checkpoint / "model.safetensors")
    for name, tensor in raw.items():
        assert torch.equal(tensor, saved.get(name, saved.get(f"module.{name}")))


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--model_config", "huge"], "Unknown model preset 'huge'", id="unknown preset"),
    pytest.param(["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU", id="fp16 on a CPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")),
])
def test_bad_input_exits_with_status_2_and_one_line(tmp_path, flags, message):
    result = run_train("--output_dir", str(tmp_path / "run"), *flags, timeout=60)
    assert result.returncode == 2
    assert f"train.py: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_torch_compile_falls_back_to_eager_with_a_warning(tmp_path):
    # No working C++ compiler, as on many laptops: inductor cannot build its kernels.
    env = {**ENV, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run([sys.executable, str(TRAIN), *QUICK, "--output_dir", str(tmp_path / "run"),
                             "--max_train_steps", "2", "--torch_compile"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--torch_compile: torch.compile failed" in result.stderr and "training in eager mode" in result.stderr
    assert (tmp_path / "run" / "model_index.json").is_file()
