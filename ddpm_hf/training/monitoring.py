"""Watching a run without slowing it: the loss and NaN/inf kept on the device, throughput, stop signals."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator


class NonFiniteLossError(RuntimeError):
    """A NaN or inf loss: the message names its step and the last good checkpoint (nothing is saved after it)."""


class LossMonitor:
    """Sums the loss between logging steps and remembers the first step with a NaN/inf loss, on the device, so
    that training steps never wait for it; `pop_mean` and `first_nonfinite_step` read it (a sync)."""

    NONE = 2**62  # no non-finite loss yet

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.steps = 0
        self.nonfinite_step = torch.tensor(self.NONE, device=device)

    def update(self, loss: torch.Tensor, step: int):
        self.total += loss
        self.steps += 1
        bad_step = self.nonfinite_step.clamp(max=step)  # the earliest bad step stays
        self.nonfinite_step = torch.where(torch.isfinite(loss), self.nonfinite_step, bad_step)

    def pop_mean(self, accelerator: Accelerator) -> float:
        """The loss averaged over the steps since the last call and over processes."""
        mean = accelerator.reduce(self.total / max(self.steps, 1), reduction="mean")
        self.total.zero_()
        self.steps = 0
        return mean.item()

    def first_nonfinite_step(self, accelerator: Accelerator) -> int | None:
        """The first step whose loss was NaN or inf on any process, or None (call it on every process)."""
        step = int(accelerator.gather(self.nonfinite_step[None]).min())
        return None if step == self.NONE else step


@dataclass
class Throughput:
    """Training images per second since the last reading; `restart` leaves sampling and saving out."""

    images_per_step: int
    step: int
    start: float = field(default_factory=time.perf_counter)

    def read(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.images_per_step / max(now - self.start, 1e-9)
        self.step, self.start = step, now
        return rate

    def restart(self, step: int):
        self.step, self.start = step, time.perf_counter()


@contextmanager
def stop_signals() -> Iterator[list[str]]:
    """Record SIGTERM and SIGINT (in the yielded list) instead of dying, so that the loop can checkpoint at
    the next step boundary; a second signal acts as it normally would."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return

    def handler(signum: int, frame):
        received.append(signal.Signals(signum).name)
        signal.signal(signum, previous[signum] or signal.SIG_DFL)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler or signal.SIG_DFL)


def stop_agreed(accelerator: Accelerator, received: list[str], at_sync_point: bool) -> bool:
    """Whether to stop now. Alone: as soon as a signal came. With several processes, they agree only at
    sync points (the logging steps), so that all of them stop at the same step."""
    if accelerator.num_processes == 1:
        return bool(received)
    if not at_sync_point:
        return False
    if received:
        accelerator.set_trigger()
    return accelerator.check_trigger()
