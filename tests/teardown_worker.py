"""One process of `accelerate launch --num_processes 2`, for tests/test_training_faults.py: a DDP model, the
collectives a checkpoint ends with, then ddpm_hf's `end_training`. Writes what the teardown saw to
FOLDER/rank-N.json (`teardown_worker.py FOLDER`; the processes' stdout would interleave)."""

import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object

from ddpm_hf.training.teardown import _backend_handles, end_training

accelerator = Accelerator()
model = accelerator.prepare(torch.nn.Linear(2, 2))
is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
gather_object([accelerator.process_index])  # an allgather of Python tensors, then a barrier: how a checkpoint ends
accelerator.wait_for_everyone()
backends = sorted({type(handle).__name__ for handle in _backend_handles()})
model_alive = weakref.ref(model)
del model
end_training(accelerator)
report = {"rank": accelerator.process_index, "ddp": is_ddp, "backends": backends,
          "model_freed": model_alive() is None, "group_destroyed": not dist.is_initialized()}
(Path(sys.argv[1]) / f"rank-{report['rank']}.json").write_text(json.dumps(report))
