"""What both benchmarks share: the configs, twin ddpm_hf/diffusers UNets, interleaved timing, peak memory, reporting.

Timing. Every figure is a ratio measured in one process: each round times every contender once, in alternating
order, and a ratio is taken per round, so that load from other processes (the CPU may be shared) hits both sides
alike; the report gives medians over rounds. The first call of each contender is a warm-up, left out of the timing;
its excess over a timed call is reported as warm-up (compile) time. On CUDA every timed call is bracketed by
`torch.cuda.synchronize`. On a CPU shared with other jobs, `--threads 1 --clock process` times the CPU seconds this
process spends (`time.process_time`), which the other jobs' load does not inflate; images/s are then per CPU-second
of one core.

Peak memory. CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the call. CPU: the growth of
the process's peak resident set size (VmHWM in /proc/self/status, reset through /proc/self/clear_refs) over the
resident size before the call, with glibc told to return freed blocks to the system (`mallopt`) so that memory
one contender freed does not hide the next one's. It counts everything the call touches, weights excepted (they
are resident before); it is measured in separate, untimed calls. `tracemalloc` would see none of torch's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
import torch.utils.flop_counter

import ddpm_hf
from ddpm_hf import UNet2DModel
from ddpm_hf.training.presets import UNET_PRESETS


@dataclass(frozen=True)
class BenchConfig:
    """One network and image size to benchmark, with its default batch and its step counts."""

    name: str
    unet: dict[str, Any]  # UNet2DModel kwargs
    batch_size: int
    sampling_steps: int  # denoising steps per timed pipeline call
    quick_sampling_steps: int  # the same under --quick
    quick_batch_size: int | None = None  # the batch under --quick on a CPU, where the default would take too long


def _unet_config(preset: str, sample_size: int) -> dict[str, Any]:
    return dict(UNET_PRESETS[preset], sample_size=sample_size, in_channels=3, out_channels=3)


CONFIGS = {
    config.name: config
    for config in (
        # 1.1M parameters (the "tiny" training preset): a network that samples in seconds on a CPU.
        BenchConfig("small-16px", _unet_config("tiny", 16), batch_size=16, sampling_steps=20, quick_sampling_steps=5),
        BenchConfig("small-32px", _unet_config("tiny", 32), batch_size=16, sampling_steps=10, quick_sampling_steps=3),
        # 35.7M parameters: the CIFAR-10 network of Ho et al. 2020 (google/ddpm-cifar10-32).
        BenchConfig("cifar10-32px", _unet_config("ddpm-cifar10", 32), batch_size=16, sampling_steps=4,
                    quick_sampling_steps=2, quick_batch_size=4),
        # 45k parameters at 8 px: the GPU suite's --smoke run, which only checks that everything runs.
        BenchConfig("micro-8px", _unet_config("micro", 8), batch_size=4, sampling_steps=3, quick_sampling_steps=3),
    )
}
DEFAULT_CONFIGS = ["small-16px", "small-32px", "cifar10-32px"]  # what the benchmarks run unless told otherwise


def twin_unets(config: dict[str, Any], seed: int = 0) -> tuple[UNet2DModel, diffusers.UNet2DModel]:
    """ddpm_hf's UNet with random weights, and diffusers' UNet of the same config holding exactly those weights."""
    torch.manual_seed(seed)
    ours = UNet2DModel(**config)
    theirs = diffusers.UNet2DModel.from_config(ours.config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS,
                        help="Networks and sizes to run (default: all).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--batch_size", type=int, help="Images per call (default: per config, 256 on CUDA).")
    parser.add_argument("--rounds", type=int, help="Timed rounds per comparison (default 5, 3 with --quick).")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's). On a CPU shared with other jobs, 1 gives steadier "
                             "ratios than oversubscribed threads.")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall: elapsed time (default); process: this process's CPU time (CPU only, best with "
                             "--threads 1 on a shared machine).")
    parser.add_argument("--quick", action="store_true", help="A few CPU minutes: fewer steps, rounds and modes.")
    parser.add_argument("--json", metavar="PATH", help="Also append the JSON lines to this file.")
    parser.add_argument("--profile", action="store_true",
                        help="After timing each mode, profile one call of ddpm_hf and of the fastest diffusers "
                             "contender, and print the ops that took the most time (to stderr).")
    parser.add_argument("--peak_tflops", type=float,
                        help="The device's dense low-precision peak, for model FLOPs utilisation (known: "
                             + ", ".join(PEAK_TFLOPS) + ").")


def pick_batch_size(args: argparse.Namespace, config: BenchConfig, device: torch.device, cuda_default: int) -> int:
    if args.batch_size:
        return args.batch_size
    if device.type == "cuda":
        return cuda_default
    return (args.quick and config.quick_batch_size) or config.batch_size


def setup(args: argparse.Namespace) -> "Clock":
    """Applies --threads and the --rounds default; the clock of the run, which knows its device."""
    device = torch.device(args.device)
    if args.clock == "process" and device.type != "cpu":
        raise SystemExit("--clock process measures CPU time: use it with --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    return Clock(device, process_time=args.clock == "process")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_profile(label: str, function: Callable[[], Any], device: torch.device, rows: int = 15) -> None:
    """Profiles one call of `function` and prints the ops with the most self time (device time on CUDA), to stderr.

    This is what a ratio alone cannot tell: whether two contenders spend their time in the same kernels. On the CPU,
    for example, both sampling pipelines spend about half their time at small-32px (a fifth at small-16px) in
    PyTorch's flash attention with head_dim 8.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        function()
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{label}\n{profiler.key_averages().table(sort_by=sort_by, row_limit=rows)}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Clock:
    """Times calls on `device`: elapsed seconds, with the device's queued work included, or CPU seconds."""

    device: torch.device
    process_time: bool = False

    def time(self, function: Callable[[], Any], wall: bool = False) -> float:
        now = time.process_time if self.process_time and not wall else time.perf_counter
        synchronize(self.device)
        start = now()
        function()
        synchronize(self.device)
        return now() - start


@dataclass
class Timing:
    """The timed calls of one contender: the warm-up call, then one call per round."""

    first_call_s: float
    calls_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.calls_s)

    @property
    def compile_s(self) -> float:
        """The warm-up's excess over a timed call: compilation, autotuning, graph capture, lazy initialisation."""
        return max(self.first_call_s - self.median_s, 0.0)


def interleave(contenders: dict[str, Callable[[], Any]], rounds: int, clock: Clock) -> dict[str, Timing]:
    """Times each contender once per round, alternating the order every round, after one warm-up call each."""
    timings = {name: warm_up(function, clock) for name, function in contenders.items()}
    time_rounds(contenders, timings, rounds, clock)
    return timings


def warm_up(function: Callable[[], Any], clock: Clock) -> Timing:
    """A contender's first call, timed on the wall clock (the compiler works in subprocesses, whose CPU time the
    process clock does not see)."""
    return Timing(clock.time(function, wall=True))


def time_rounds(contenders: dict[str, Callable[[], Any]], timings: dict[str, Timing], rounds: int, clock: Clock
                ) -> None:
    """Adds `rounds` timed calls of each (warmed-up) contender to its `Timing`, alternating the order every round."""
    names = list(contenders)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            timings[name].calls_s.append(clock.time(contenders[name]))


def speedup(timings: dict[str, Timing], ours: str, *theirs: str) -> float:
    """Median over rounds of (the fastest of `theirs` in that round) / `ours`: how many times faster ours is."""
    ratios = [min(timings[name].calls_s[i] for name in theirs) / timings[ours].calls_s[i]
              for i in range(len(timings[ours].calls_s))]
    return statistics.median(ratios)


# Peak memory


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field_name}:\s+(\d+) kB", status.read()).group(1))


@contextlib.contextmanager
def _return_freed_memory():
    """Makes glibc hand freed blocks back to the system (so RSS tracks live memory); Linux only."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)
    libc.malloc_trim(0)  # what earlier calls freed but glibc kept
    yield


def peak_memory_mib(function: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory one call adds above what was in use before it, in MiB (None where it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with _return_freed_memory():
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
        function()
        return (_rss_kib("VmHWM") - before) / 1024


# Model FLOPs utilisation

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of the GPUs the issue's targets name; others: pass --peak_tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def unet_flops(unet: torch.nn.Module, sample: torch.Tensor, backward: bool = False) -> int:
    """FLOPs of one UNet forward (and backward) pass on `sample`, counted by `torch.utils.flop_counter`."""
    timesteps = torch.full((sample.shape[0],), 500, device=sample.device)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            output = unet(sample, timesteps).sample
            if backward:
                output.float().mean().backward()
    if backward:
        unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((peak for gpu, peak in PEAK_TFLOPS.items() if gpu in name), None)


# Reporting


def environment(clock: Clock) -> dict[str, Any]:
    """The machine and versions behind the numbers."""
    device = clock.device
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = _cpu_name()
    return {
        "date": datetime.date.today().isoformat(),
        "device": device.type,
        "machine": machine,
        "threads": torch.get_num_threads(),
        "clock": "process CPU time" if clock.process_time else "wall",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "ddpm_hf": ddpm_hf.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = re.search(r"model name\s*:\s*(.+)", cpuinfo.read()).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def report(title: str, rows: Sequence[dict[str, Any]], columns: dict[str, str], env: dict[str, Any],
           json_path: str | None = None) -> None:
    """Prints a Markdown table of `rows` (`columns` maps row keys to headers), then one JSON line per row."""
    print(f"\n### {title}\n")
    print(f"{env['machine']} ({env['device']}, {env['threads']} threads, {env['clock']} clock); torch {env['torch']}, "
          f"diffusers {env['diffusers']}, ddpm_hf {env['ddpm_hf']}, Python {env['python']}; {env['date']}.\n")
    print("| " + " | ".join(columns.values()) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(_format(row.get(key)) for key in columns) + " |")
    print()
    lines = [json.dumps({**row, **env}) for row in rows]
    print("\n".join(lines))
    if json_path:
        with open(json_path, "a") as file:
            file.write("\n".join(lines) + "\n")


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"
    return str(value)
