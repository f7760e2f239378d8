"""Resumable checkpoints: `accelerator.save_state` plus where training stands, written atomically.

A checkpoint is `output_dir/checkpoints/checkpoint-{step}/`, holding what Accelerate saves (model,
optimizer, LR schedule, gradient scaler, EMA, every process's RNG states) and one
`train_state_{rank}.json` per process (global step, epoch, position in the epoch, a hash of its
weights), plus `data_state_{rank}.pt` with the stream position when streaming. It is written to a
hidden temporary folder and renamed into place, so a crash mid-save leaves the older ones intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


@dataclass
class Progress:
    """Where training stands; together with Accelerate's state, enough to continue exactly."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0  # passes over the data started
    batches_in_epoch: int = 0  # micro-batches of this epoch consumed (on this process)
    training_seconds: float = 0.0  # wall time spent in the training loop, over all resumes
    total_steps: int | None = None  # the run's length when --max_train_minutes decided it (a resumed run keeps it)


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint folder's name, or None when the name is not `checkpoint-{step}`."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoint_progress(checkpoint: Path) -> Progress:
    """Where the run stood when `checkpoint` was saved (as the main process recorded it), without loading it."""
    state = json.loads((checkpoint / "train_state_0.json").read_text(encoding="utf-8"))
    return Progress(**{f.name: state[f.name] for f in fields(Progress) if f.name in state})


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The finished checkpoints in `output_dir`, oldest first (temporary folders are hidden and not listed)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    found = [path for path in folder.glob("checkpoint-*") if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names ("latest": the newest in output_dir, None if there is none)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / "train_state_0.json").is_file():
        found = [str(p) for p in list_checkpoints(path.parent)] if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a checkpoint (no train_state_0.json in it). "
            + (f"Checkpoints beside it: {', '.join(found)}." if found else "Pass a checkpoint-N folder or 'latest'.")
        )
    return path


def weights_sha256(parameters: Iterable[torch.Tensor]) -> str:
    """A hash of the parameters' float32 values: equal on every process exactly when their weights are."""
    digest = hashlib.sha256()
    for parameter in parameters:
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    progress: Progress,
    weights: dict[str, str],
    dataset: torch.utils.data.Dataset,
    total_limit: int | None,
) -> Path:
    """Save a checkpoint at `progress.global_step` (all processes call this) and keep the newest `total_limit`.

    `weights` names hashes of this process's weights (see [`weights_sha256`]), recorded so that
    anyone can check that every process held the same ones.
    """
    folder = Path(output_dir) / CHECKPOINTS_DIR
    final = folder / f"checkpoint-{progress.global_step}"
    temporary = folder / f".checkpoint-{progress.global_step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # debris of a save that crashed
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(temporary))  # each process writes its own RNG states into it
    rank = accelerator.process_index
    state = {**asdict(progress), "num_processes": accelerator.num_processes, "weights_sha256": weights}
    (temporary / f"train_state_{rank}.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        torch.save(dataset.state_dict(), temporary / f"data_state_{rank}.pt")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        replace(temporary, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, dataset: torch.utils.data.Dataset) -> Progress:
    """Restore everything `save_checkpoint` saved into the prepared objects; returns this process's `Progress`."""
    state_file = checkpoint / f"train_state_{accelerator.process_index}.json"
    saved_by = json.loads((checkpoint / "train_state_0.json").read_text(encoding="utf-8"))["num_processes"]
    if saved_by != accelerator.num_processes:
        message = f"{checkpoint} was saved by {saved_by} processes and is resumed by {accelerator.num_processes}"
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError(f"{message}: each process's position in the stream cannot be carried over. "
                             f"Resume with --num_processes {saved_by}.")
        logger.warning(f"{message}: the data order changes, so the run will not match an uninterrupted one.")
        state_file = checkpoint / "train_state_0.json"  # the step and epoch, the same on every process

    accelerator.load_state(str(checkpoint))
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.load_state_dict(torch.load(checkpoint / f"data_state_{accelerator.process_index}.pt"))
    state = json.loads(state_file.read_text(encoding="utf-8"))
    return Progress(**{f.name: state[f.name] for f in fields(Progress)})


def replace(source: Path, target: Path):
    """Rename `source` to `target`, replacing it; a folder already there is moved aside first, then deleted."""
    if target.is_dir():
        stale = target.with_name(f".{target.name}.old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(target, stale)
        os.replace(source, target)
        shutil.rmtree(stale)
    else:
        os.replace(source, target)
