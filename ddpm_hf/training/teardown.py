"""Ending a run's process group without the hang that gloo can have at exit.

`accelerator.end_training()` destroys the process group, but DistributedDataParallel's reducer keeps a
reference to it, so the group's C++ destructor runs later, when the last Python object holding the DDP
model is freed, and with the GIL held. That destructor joins gloo's worker threads, and a worker that is
still freeing the last collective's tensors needs the GIL to do it: each waits for the other forever.
py-spy showed exactly this after a two-machine SIGTERM stop on a loaded CPU (3 stops in 60):
`Reducer::~Reducer` → `~ProcessGroupGloo` → `std::thread::join` on the main thread, the worker in
`~AsyncAllgatherWork` → `gil_scoped_acquire`.

The Python handle of a gloo backend (`ProcessGroupGloo`) releases the GIL while its destructor
runs. So `train` lets go of its DDP model first, and `end_training` holds a backend handle while the group is
destroyed and drops it last: the join then happens with the GIL free, and the worker can finish.
"""

from __future__ import annotations

import gc

import torch.distributed as dist
from accelerate import Accelerator


def end_training(accelerator: Accelerator) -> None:
    """`accelerator.end_training()` (trackers finished, process group destroyed), where it cannot hang.

    Call it once nothing refers to the DDP model any more (`train` lets go of its `Run` first): the model then
    goes before the group's last handle."""
    handles = _backend_handles()
    if handles:
        gc.collect()  # a DDP model caught in a reference cycle goes now, not at some later collection
    accelerator.end_training()
    del handles  # the group's last reference: its destructor joins the worker threads here, with the GIL released


def _backend_handles() -> list:
    """Python handles of the default group's backends, or none outside a distributed run.

    `_get_default_group` and `_get_backend` are private to PyTorch; without them this does nothing and the
    teardown is PyTorch's own."""
    if not (dist.is_available() and dist.is_initialized()):
        return []
    try:
        group = dist.distributed_c10d._get_default_group()
        return [group._get_backend(device) for device in group._device_types]
    except (AttributeError, RuntimeError, ValueError):
        return []
