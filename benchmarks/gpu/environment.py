"""Part 1: the machine and the versions behind the numbers, and the measured bf16 matmul rate (the MFU denominator)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys

import torch
from packaging.requirements import Requirement

from context import PartContext

PACKAGES = ("diffusers", "accelerate", "datasets", "huggingface_hub", "safetensors", "numpy", "pillow")


def run(ctx: PartContext) -> None:
    device = ctx.device
    facts = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **{name: _version(name) for name in PACKAGES},
        "ddpm_hf_commit": _git_commit(),
        "ddpm_hf_source_sha256": source_digest(),
        "unmet_requirements": unmet_requirements(("diffusers", "datasets", "accelerate")),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        facts |= {
            "gpu": properties.name,
            "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
            "multiprocessors": properties.multi_processor_count,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "driver": _nvidia_smi("driver_version"),
        }
    else:
        facts |= {"gpu": None, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    size, repeats = (8192, 10) if device.type == "cuda" and not ctx.smoke else (256, 3)
    facts["bf16_matmul_tflops"] = matmul_tflops(device, torch.bfloat16, size, repeats)
    facts["matmul_size"] = size
    ctx.record("environment", **facts)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Median rate of `size`^3 matrix products on random data (zeros can run faster), after three warm-ups."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e12


def unmet_requirements(packages: tuple[str, ...]) -> list[str]:
    """Requirements of `packages` that the installed versions do not meet (the wheels travel without their
    dependencies, so this is where a mismatch with the device's image would show)."""
    unmet = []
    for package in packages:
        try:
            requirements = importlib.metadata.requires(package) or []
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{package} (not installed)")
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            found = _version(requirement.name)
            if found is None or not requirement.specifier.contains(found, prereleases=True):
                unmet.append(f"{package} needs {requirement}, found {found}")
    return unmet


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        output = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=20, check=True).stdout
        return output.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def source_digest() -> str:
    """A digest of ddpm_hf's source files: names the code measured where the copied tree has no git history."""
    import hashlib
    from pathlib import Path

    import ddpm_hf

    digest = hashlib.sha256()
    for path in sorted(Path(ddpm_hf.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True, cwd=sys.path[0]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
