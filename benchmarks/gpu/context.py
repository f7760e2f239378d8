"""What every part of the GPU suite works with: its time budget, its device and a way to record results."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Budget:
    """A part's deadline on the monotonic clock; `allows(seconds)` says whether a task of that cost still fits."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


@dataclass
class PartContext:
    """One part's run: its budget and device, the environment part's findings, and the results file it appends to.

    Records are JSON lines written as they come, so a part killed at its hard time limit keeps what it measured.
    """

    part: str
    device: torch.device
    smoke: bool
    budget: Budget
    results_file: Path
    work_dir: Path  # scratch space for files the part makes (image folders, training runs)
    environment: dict[str, Any] = field(default_factory=dict)  # the environment part's record, for later parts

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        entry = {"part": self.part, "kind": kind, **fields}
        with self.results_file.open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry, default=str) + "\n")
        print(f"[{self.part}] {kind}: " + ", ".join(f"{k}={_short(v)}" for k, v in fields.items()), flush=True)
        return entry

    def skip(self, what: str, reason: str) -> None:
        """Records a task left out (over budget, not applicable here), so the report says what was not run."""
        self.record("skipped", what=what, reason=reason)

    @contextmanager
    def task(self, what: str, estimate_s: float = 0.0) -> Iterator[bool]:
        """`with ctx.task("name", estimate_s) as run: if run: ...`: False (and a skip recorded) when the estimate no
        longer fits the budget; an exception inside is recorded as this task's error and the part goes on."""
        if not self.budget.allows(estimate_s):
            self.skip(what, f"over budget: needs ~{estimate_s:.0f} s, {max(self.budget.left(), 0):.0f} s left")
            yield False
            return
        try:
            yield True
        except Exception as error:  # a failing task must not take the rest of the part with it
            self.record("error", what=what, error=f"{type(error).__name__}: {error}",
                        traceback=traceback.format_exc(limit=8)[-3000:])
            release_device_memory(self.device)

    @property
    def peak_tflops(self) -> float | None:
        """The measured dense bf16 matmul rate, the denominator of model FLOPs utilisation (MFU)."""
        return self.environment.get("bf16_matmul_tflops")


def release_device_memory(device: torch.device) -> None:
    """Frees what a finished task left on the device, so the next one's peak memory and speed are its own."""
    import gc

    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _short(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
