"""Files that readers and crashes never see half-written: write under a temporary name, fsync, rename, fsync the folder.

Every file ddpm_hf publishes goes through `atomic_write`: cached statistics, plots, sample grids, model cards,
sampler configs, run records. A rename is atomic only for data that reached the disk, so the file is fsynced
before it and the folder after it (the protocol of SQLite, etcd and Orbax). The temporary name is hidden, holds
the writer's pid (two processes filling one cache do not collide) and ends in ".tmp", which is how
`ddpm_hf.training.durable_io.remove_debris` recognises what a killed process left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to the disk."""
    if os.name == "nt" and os.path.isdir(path):  # Windows cannot open a folder; NTFS journals its entries
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write the whole file to; when the block ends, the file
    is made durable and renamed over `path`. If the block raises, the temporary file is removed and `path` is
    untouched.

    Example:

    ```python
    >>> with atomic_write("samples.png") as temporary:
    ...     image.save(temporary, format="PNG")  # name the format: the temporary name ends in .tmp
    ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (UTF-8) through `atomic_write`."""
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomically(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write `record` to `path` as indented JSON through `atomic_write`."""
    write_text_atomically(path, json.dumps(record, indent=2) + "\n")
