"""Resumable checkpoints: `accelerator.save_state` plus where training stands, committed atomically and durably.

A checkpoint is `output_dir/checkpoints/checkpoint-{step}/`, holding what Accelerate saves (the model as
safetensors; the optimizer, LR schedule, gradient scaler and every process's RNG states as weights-only
pickles), the EMA weights as `ema.safetensors`, one `train_state_{rank}.json` per process (global step,
epoch, position in the epoch, a hash of its weights) and, when streaming, `data_state_{rank}.json`.

Saving is a commit: every process writes and fsyncs its files in a hidden temporary folder; then the main
process writes `checkpoint_complete.json` (the size and sha256 of every file), fsyncs the folder, renames it
into place and fsyncs `checkpoints/` (see `durable_io`). A checkpoint without that marker, or whose files do
not match it, is incomplete or corrupt, and `find_checkpoint` never picks it.

Loading never unpickles anything but tensors, numbers and the numpy arrays of RNG states: every pickle is
opened with `torch.load(weights_only=True)` and Accelerate's own allow-list, before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .agreement import all_or_none
from .durable_io import commit_folder, fsync, remove_folder, write_failure, write_text

logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "checkpoint_complete.json"  # written last: the files of the checkpoint, their sizes and hashes
EMA_WEIGHTS = "ema.safetensors"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# Files each process writes for itself; the main process writes the rest.
_PER_PROCESS_FILES = ("train_state_{rank}.json", "random_states_{rank}.pkl", "data_state_{rank}.json")
# What every checkpoint holds, whatever the run's options.
_REQUIRED_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")
_REQUIRED_PER_PROCESS = ("train_state_{rank}.json", "random_states_{rank}.pkl")


class CorruptCheckpointError(ValueError):
    """A checkpoint that is incomplete or damaged: `file` is the first bad file, `reason` says what is wrong."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file} {reason}")
        self.file, self.reason = file, reason

    def __reduce__(self):  # keeps `file` and `reason` when sent to the other processes
        return type(self), (self.file, self.reason)


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
    """The checkpoint folders in `output_dir`, oldest first (temporary folders are hidden and not listed; an
    incomplete or corrupt one is, and `verify_checkpoint` tells)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    found = [path for path in folder.glob("checkpoint-*") if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names, verified (see [`verify_checkpoint`]).

    "latest" is the newest complete and intact checkpoint in output_dir (None if there is none); newer ones
    that are not are skipped with a warning naming the bad file. A named checkpoint that is not intact raises
    [`CorruptCheckpointError`] (a `ValueError`) naming the file.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        for checkpoint in reversed(checkpoints):
            try:
                verify_checkpoint(checkpoint)
                return checkpoint
            except CorruptCheckpointError as error:
                logger.warning(f"Skipping {checkpoint.name}, which cannot be resumed: {error}.")
        if checkpoints:
            logger.warning(f"No checkpoint in {Path(output_dir) / CHECKPOINTS_DIR} can be resumed: training starts "
                           "from step 0.")
        return None
    path = Path(resume_from_checkpoint)
    if not any((path / name).is_file() for name in (COMPLETE_MARKER, "train_state_0.json")):
        found = [str(p) for p in list_checkpoints(path.parent)] if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a checkpoint (no {COMPLETE_MARKER} in it). "
            + (f"Checkpoints beside it: {', '.join(found)}." if found else "Pass a checkpoint-N folder or 'latest'.")
        )
    try:
        verify_checkpoint(path)
    except CorruptCheckpointError as error:
        advice = "Pass an older checkpoint, or 'latest' for the newest intact one"
        raise CorruptCheckpointError(
            error.file, f"{error.reason}: --resume_from_checkpoint {path} cannot be resumed. {advice}") from None
    return path


def verify_checkpoint(checkpoint: Path) -> dict:
    """Check that every file the marker lists is there, unchanged (size, sha256) and loadable without running
    code (JSON, safetensors, weights-only pickles), and that nothing else is; returns the marker.

    Raises [`CorruptCheckpointError`] naming the first bad file.
    """
    marker = _read_json(checkpoint / COMPLETE_MARKER, missing="is missing: the save of this checkpoint never finished")
    try:
        num_processes = int(marker["num_processes"])
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in marker["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CorruptCheckpointError(checkpoint / COMPLETE_MARKER, "does not list the checkpoint's files") from None
    if any(Path(name).name != name or name in ("", ".", "..") for name in files):
        raise CorruptCheckpointError(checkpoint / COMPLETE_MARKER, "names files outside the checkpoint")
    required = list(_REQUIRED_FILES) + [name.format(rank=rank) for name in _REQUIRED_PER_PROCESS
                                        for rank in range(num_processes)]
    for name in required:
        if name not in files:
            raise CorruptCheckpointError(checkpoint / name, f"is not listed in {COMPLETE_MARKER}")
    for path in sorted(checkpoint.iterdir()):
        if path.name != COMPLETE_MARKER and path.name not in files:
            raise CorruptCheckpointError(path, "was not part of the saved checkpoint (added later)")
    for name, (saved_bytes, saved_sha256) in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise CorruptCheckpointError(path, "is missing")
        size = path.stat().st_size
        if size != saved_bytes:
            raise CorruptCheckpointError(path, f"has {size:,} bytes, but {saved_bytes:,} were saved (truncated?)")
        if file_sha256(path) != saved_sha256:
            raise CorruptCheckpointError(path, "has changed since it was saved (its sha256 differs)")
        _check_loadable(path)
    return marker


def _check_loadable(path: Path):
    """Open `path` as its format says, refusing pickles of anything but tensors, numbers and RNG states."""
    if path.suffix == ".json":
        _read_json(path)
    elif path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as file:
                file.keys()
        except (SafetensorError, OSError) as error:
            raise CorruptCheckpointError(path, f"is not a readable safetensors file ({error})") from None
    else:
        load_pickle(path)


def load_pickle(path: Path):
    """`torch.load` allowing only tensors, containers, numbers and the numpy arrays of RNG states (Accelerate's
    list); anything else raises [`CorruptCheckpointError`] before any of it is built."""
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError of a damaged zip, EOFError, ...
        refusal = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\n|$)", str(error))
        detail = f"refused to unpickle: {refusal.group(1)}" if refusal else f"{type(error).__name__}: {error}"
        raise CorruptCheckpointError(path, f"is not a weights-only pickle ({detail})") from None


def _read_json(path: Path, missing: str = "is missing") -> dict:
    if not path.is_file():
        raise CorruptCheckpointError(path, missing)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(path, f"is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(path, "does not hold a JSON object")
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(parameters: Iterable[torch.Tensor]) -> str:
    """A hash of the parameters' float32 values: equal on every process exactly when their weights are."""
    digest = hashlib.sha256()
    for parameter in parameters:
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def weights_bytes(module: torch.nn.Module) -> int:
    """The bytes of `module`'s parameters and buffers."""
    return sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values())


def checkpoint_bytes(unet: torch.nn.Module, with_ema: bool) -> int:
    """About how many bytes a checkpoint of `unet` takes: its weights, AdamW's two moments, the EMA copy."""
    return weights_bytes(unet) * (3 + with_ema) + 64 * 1024  # + the RNG states, train states and LR schedule


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    progress: Progress,
    weights: dict[str, str],
    dataset: torch.utils.data.Dataset,
    ema: EMAModel | None,
    parameter_names: Sequence[str],
    total_limit: int | None,
    size_estimate: int,
) -> Path:
    """Save and commit a checkpoint at `progress.global_step` (all processes call this); keep the newest
    `total_limit`.

    `weights` names hashes of this process's weights (see [`weights_sha256`]), recorded so that anyone can
    check that every process held the same ones; `parameter_names` name the EMA's tensors. If any process
    fails to write, the temporary folder is removed and every process raises `WriteFailedError`, saying how
    much space the checkpoint needs (as much as the previous one, or else `size_estimate` bytes).
    """
    folder = Path(output_dir) / CHECKPOINTS_DIR
    final = folder / f"checkpoint-{progress.global_step}"
    temporary = folder / f".{final.name}.tmp"
    if previous := list_checkpoints(output_dir):  # a better estimate than the model's size
        size_estimate = sum(path.stat().st_size for path in previous[-1].iterdir() if path.is_file())
    agreed = dict(failure=lambda error: write_failure(f"checkpoint {final.name}", folder, error, size_estimate),
                  cleanup=lambda: shutil.rmtree(temporary, ignore_errors=True))
    with all_or_none(accelerator, **agreed):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)  # debris of a save that crashed
            temporary.mkdir(parents=True)
    with all_or_none(accelerator, **agreed):
        write_process_files(accelerator, temporary, progress, weights, dataset, ema, parameter_names)
    with all_or_none(accelerator, **agreed):
        if accelerator.is_main_process:
            write_complete_marker(temporary, progress.global_step, accelerator.num_processes)
            commit_folder(temporary, final)
    if accelerator.is_main_process and total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            try:
                remove_folder(old)
            except OSError as error:  # the new checkpoint is safe; an old one left behind is no reason to stop
                logger.warning(f"Could not delete {old} (--checkpoints_total_limit {total_limit}): {error}")
    accelerator.wait_for_everyone()
    return final


def write_process_files(accelerator: Accelerator, folder: Path, progress: Progress, weights: dict[str, str],
                        dataset: torch.utils.data.Dataset, ema: EMAModel | None, parameter_names: Sequence[str]):
    """This process's share of a checkpoint, fsynced: Accelerate's state (the main process writes the model,
    optimizer and LR schedule; each process its RNG states), the EMA, its train and data states."""
    accelerator.save_state(str(folder))
    rank = accelerator.process_index
    state = {**asdict(progress), "num_processes": accelerator.num_processes, "weights_sha256": weights}
    write_text(folder / f"train_state_{rank}.json", json.dumps(state, indent=2) + "\n", in_place=True)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        write_text(folder / f"data_state_{rank}.json", json.dumps(dataset.state_dict()) + "\n", in_place=True)
    if ema is not None and accelerator.is_main_process:
        scalars = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
        tensors = {name: tensor.detach().contiguous() for name, tensor in zip(parameter_names, ema.shadow_params)}
        save_file(tensors, folder / EMA_WEIGHTS, metadata={"ema_state": json.dumps(scalars)})
    for name in _PER_PROCESS_FILES:  # the main process fsyncs everything when it commits
        if (path := folder / name.format(rank=rank)).is_file():
            fsync(path)


def write_complete_marker(folder: Path, step: int, num_processes: int):
    """`checkpoint_complete.json`: the step, the process count and every file's size and sha256, fsynced."""
    files = {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(folder.iterdir()) if path.is_file()}
    marker = {"step": step, "num_processes": num_processes, "files": files}
    write_text(folder / COMPLETE_MARKER, json.dumps(marker, indent=2) + "\n", in_place=True)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, dataset: torch.utils.data.Dataset,
                    ema: EMAModel | None, parameter_names: Sequence[str]) -> Progress:
    """Restore everything `save_checkpoint` saved into the prepared objects; returns this process's `Progress`.

    Call it with a checkpoint that [`find_checkpoint`] returned (verified). A checkpoint of another model,
    optimizer or EMA setting raises `ValueError`.
    """
    state_file = checkpoint / f"train_state_{accelerator.process_index}.json"
    saved_by = json.loads((checkpoint / "train_state_0.json").read_text(encoding="utf-8"))["num_processes"]
    if saved_by != accelerator.num_processes:
        message = f"{checkpoint} was saved by {saved_by} processes and is resumed by {accelerator.num_processes}"
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError(f"{message}: each process's position in the stream cannot be carried over. "
                             f"Resume with --num_processes {saved_by}.")
        logger.warning(f"{message}: the data order changes, so the run will not match an uninterrupted one.")
        state_file = checkpoint / "train_state_0.json"  # the step and epoch, the same on every process
    has_ema = (checkpoint / EMA_WEIGHTS).is_file()
    if has_ema != (ema is not None):
        raise ValueError(f"{checkpoint} was saved {'with' if has_ema else 'without'} an EMA of the weights; resume "
                         f"it with {'--use_ema' if has_ema else '--no-use_ema'}.")
    try:
        accelerator.load_state(str(checkpoint))  # its pickles are weights-only (verified): Accelerate's default
        if ema is not None:
            load_ema(ema, checkpoint / EMA_WEIGHTS, parameter_names)
    except (RuntimeError, ValueError, KeyError) as error:  # another architecture, optimizer or schedule
        raise ValueError(f"{checkpoint} does not fit this run ({type(error).__name__}: {error}). Resume it with "
                         "the --model_config and optimizer flags it was saved with.") from error
    if isinstance(dataset, torch.utils.data.IterableDataset):
        path = checkpoint / f"data_state_{accelerator.process_index}.json"
        dataset.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
    state = json.loads(state_file.read_text(encoding="utf-8"))
    return Progress(**{f.name: state[f.name] for f in fields(Progress)})


def load_ema(ema: EMAModel, path: Path, parameter_names: Sequence[str]):
    """Load `ema.safetensors`: the averaged weights, and the EMA's step and decay settings from its metadata."""
    with safe_open(path, framework="pt") as file:
        scalars = json.loads(file.metadata()["ema_state"])
    tensors = load_file(path)
    if sorted(tensors) != sorted(parameter_names):
        raise ValueError(f"{path} holds averages of other parameters than the model's")
    ema.load_state_dict({**scalars, "shadow_params": [tensors[name] for name in parameter_names]})
