"""The sweep's curve: distance against model calls, a line per sampler. Needs matplotlib (`ddpm_hf[plots]`)."""

from __future__ import annotations

import os
from pathlib import Path

try:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib import ticker
except ImportError:  # an optional extra: everything else works without it
    plt = None

from ..utils.atomic_files import atomic_write
from .sweep import SamplerSweep

CAN_PLOT = plt is not None


def plot_sweep(sweep: SamplerSweep, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the Fréchet distance of every pair against its model calls (log axis), one line per sampler, the
    real-data floor as a band (± its standard deviation), the recommendation ringed; write a PNG atomically."""
    if not CAN_PLOT:
        raise ImportError("Drawing the sweep needs matplotlib: `pip install ddpm_hf[plots]` (or matplotlib).")
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for sampler in dict.fromkeys(point.sampler for point in sweep.points):
        points = sorted((p for p in sweep.points if p.sampler == sampler), key=lambda p: p.model_calls)
        axes.plot([p.model_calls for p in points], [p.frechet_distance for p in points], marker="o", label=sampler)
    if sweep.floor is not None:
        floor = sweep.floor
        axes.axhspan(floor.frechet_distance - floor.std, floor.frechet_distance + floor.std, color="0.85",
                     label=f"real data: {floor.frechet_distance:.2f} ± {floor.std:.2f}", zorder=0)
    baseline = sweep.point("ddpm", sweep.num_train_timesteps)
    if baseline is not None:
        axes.axhline(baseline.frechet_distance, color="0.4", linestyle="--", linewidth=1,
                     label=f"ddpm, {sweep.num_train_timesteps} steps: {baseline.frechet_distance:.2f}")
    best = sweep.recommendation
    axes.scatter([best.model_calls], [best.frechet_distance], s=260, facecolors="none", edgecolors="black",
                 linewidths=2, zorder=5, label=f"recommended: {best.sampler}, {best.steps} steps "
                                              f"({best.frechet_distance:.2f})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    calls = sorted({point.model_calls for point in sweep.points})
    axes.set_xticks(calls, [str(count) for count in calls])
    axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    axes.yaxis.set_major_formatter(ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel("model calls per image (log)")
    axes.set_ylabel(f"Fréchet distance, {_feature_label(sweep.features)} (log)")
    axes.set_title(title or f"Samplers on {sweep.num_samples} samples, vs {sweep.reference}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_write(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return path


def _feature_label(features: str) -> str:
    return "digits features" if features.startswith("digits") else "Inception features (FID)"
