"""Folders that survive a crash or a power loss (checkpoints, the final pipeline), and what failed writes leave.

Single files go through `ddpm_hf.utils.atomic_files`; a folder is written whole under a temporary name, then
published with one rename.

A rename is atomic only for what reached the disk: after a power loss, a file renamed before its data
was flushed can come back empty or full of zeros, and a rename not yet flushed in its folder can be
undone. So files and folders are fsynced before the rename that publishes them, and the parent folder
after it (the protocol of SQLite, etcd and Orbax). Temporary names start with "." and end in
`TEMPORARY_SUFFIXES`; whatever a killed process left under such a name is removed by `remove_debris`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from ..utils.atomic_files import fsync, write_text_atomically

try:
    import resource
except ImportError:  # Windows: no file-size limits to diagnose
    resource = None

TEMPORARY_SUFFIXES = (".tmp", ".old", ".deleting")  # written, replaced, being deleted
_SPACE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}


class WriteFailedError(RuntimeError):
    """A save could not be written (disk full, file-size limit, I/O error); nothing saved before it was lost."""


def fsync_tree(folder: Path):
    """fsync every file under `folder`, then every folder, deepest first (a folder holds its entries' names)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(os.path.join(root, name))
        fsync(root)


def write_text(path: Path, text: str, *, in_place: bool = False):
    """Write `text` to `path` durably: through a temporary file renamed over it, or directly with `in_place`
    (for files inside a folder that is itself committed by renaming it)."""
    if not in_place:
        write_text_atomically(path, text)
        return
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def commit_folder(temporary: Path, final: Path):
    """Make the fully written folder `temporary` durable, then rename it to `final` (replacing a folder there)."""
    fsync_tree(temporary)
    replace(temporary, final)
    fsync(final.parent)


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


def remove_folder(folder: Path):
    """Delete `folder` so that it vanishes at once: renamed to a temporary name, then deleted."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def remove_debris(folder: Path) -> list[str]:
    """Delete what interrupted writes left in `folder` (hidden names ending in `TEMPORARY_SUFFIXES`); returns
    their names. Call it only where no other process can be writing (see `run_lock`)."""
    if not folder.is_dir():
        return []
    debris = sorted(path for path in folder.iterdir() if path.name.startswith(".") and
                    path.name.endswith(TEMPORARY_SUFFIXES))
    for path in debris:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [path.name for path in debris]


def write_failure(what: str, folder: Path, error: Exception, bytes_needed: int) -> WriteFailedError:
    """The error to raise when writing `what` into `folder` failed with `error`: why, and the space it takes."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    reason = _failure_reason(error, free, bytes_needed)
    remedy = ("Raise the limit (`ulimit -f unlimited`)" if "file-size limit" in reason
              else "Free some space (or lower --checkpoints_total_limit)")
    return WriteFailedError(
        f"Could not save {what} in {folder}: {reason}. It needs about {format_bytes(bytes_needed)}, and "
        f"{format_bytes(free)} are free there. The unfinished copy was removed; the older checkpoints and the "
        f"saved pipeline are intact. {remedy}, then continue with --resume_from_checkpoint latest."
    )


def _failure_reason(error: Exception, free: int, bytes_needed: int) -> str:
    """What the OS said, read from the error (PyTorch's writer drops the errno) or else from the disk's state."""
    found = error
    while found is not None and not isinstance(found, OSError):
        found = found.__cause__ or found.__context__
    code = found.errno if isinstance(found, OSError) else None
    if code is None and (match := re.search(r"os error (\d+)", str(error))):  # safetensors' Rust I/O errors
        code = int(match.group(1))
    if code in _SPACE_ERRNOS:
        return f"{_SPACE_ERRNOS[code]} ({os.strerror(code)})"
    if code is None and free < bytes_needed:
        return "the disk is full"  # PyTorch's writer says only "unexpected pos"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else None
    limited = resource is not None and limit != resource.RLIM_INFINITY
    if code == errno.EFBIG or (code is None and limited):
        size = f" of {format_bytes(limit)}" if limited else ""
        return f"a file would grow past the file-size limit{size} (`ulimit -f`)"
    return f"{type(error).__name__}: {error}"


def format_bytes(size: int) -> str:
    """`1234567` -> `"1.2 MB (1,234,567 bytes)"`."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit} ({size:,} bytes)"
    return f"{size:,} bytes"
