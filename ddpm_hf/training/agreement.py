"""Keeping the processes of a run in step around file system work: one decides for all, or all fail together.

A process that raises while the others wait at a barrier leaves them waiting forever. So work that can
fail on one process only (a full disk under the main process's writes, a checkpoint only it reads) is
followed by an exchange through which every process learns the outcome, and then all go on or all raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

T = TypeVar("T")


def decided_by_main(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` on the main process, its result (or the exception it raised) on every process."""
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = (decide(), None)
        except Exception as error:  # raised on every process below
            outcome[0] = (None, error)
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


@contextmanager
def all_or_none(accelerator: Accelerator, failure: Callable[[Exception], Exception],
                cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block on every process; if it raises on any, `cleanup()` on the main process and raise
    `failure(error)` (built where it happened, after a cleanup there) on all of them, chained to the error where
    there is one."""
    error = raised = None
    try:
        yield
    except Exception as caught:
        if cleanup is not None and accelerator.is_main_process:
            cleanup()
        error, raised = caught, failure(caught)
    raised_anywhere = [raised]
    if accelerator.num_processes > 1:
        raised_anywhere = gather_object([raised])
    first = next((exception for exception in raised_anywhere if exception is not None), None)
    if first is None:
        return
    if cleanup is not None and accelerator.is_main_process:
        cleanup()
    raise first from error
