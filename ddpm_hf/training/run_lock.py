"""One training run per output_dir: a lock that names its holder and that dies with it.

The main process holds an `flock` on `output_dir/.training.lock` for the whole run, and writes its pid,
host and start time into the file. A second run on the same output_dir (a second `accelerate launch` by
mistake, a scheduler restarting a job that is still alive) finds it taken and stops at once, naming that
pid and host. The kernel (or, on NFS, the server) drops the lock of a process that dies, even by SIGKILL,
so the next run takes it over; the file's old contents tell it that the previous run never released it.
Where the file system has no `flock`, the pid decides instead: a lock of this host whose process is gone
is stale, one of another host is respected.

The other processes then read the file back: a multi-node run needs output_dir on a file system that
every node shares, since each process writes its RNG states into every checkpoint and reads whole
checkpoints when resuming.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from .agreement import all_or_none, decided_by_main
from .checkpointing import CHECKPOINTS_DIR
from .durable_io import remove_debris
from .outputs import SAMPLES_DIR

try:
    import fcntl
except ImportError:  # Windows: the pid decides
    fcntl = None

logger = get_logger(__name__)

LOCK_FILE = ".training.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_ORPHAN_SECONDS = 15  # how long the forked children of a dead holder may keep its lock


class OutputDirLockedError(RuntimeError):
    """Another training run, still alive, holds the output_dir."""


@dataclass
class RunLock:
    """The lock of this run on its output_dir; only the main process holds the file (`descriptor`)."""

    path: Path
    owner: dict  # pid, host, started, run_id of the holder
    descriptor: int | None = None
    created_output_dir: bool = False

    def release(self):
        """Delete the lock file and let go of it (the main process); an output_dir made only for it goes too."""
        if self.descriptor is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.descriptor)
            self.descriptor = None
        if self.created_output_dir and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def lock_output_dir(accelerator: Accelerator, output_dir: str | Path) -> RunLock:
    """Lock `output_dir` for this run (all processes call this), and remove what interrupted saves left there.

    Raises:
        OutputDirLockedError: on every process, if another live run holds it (the message names its pid and host).
        ValueError: if a process does not see the lock file the main process wrote (output_dir is not shared).
    """
    path = Path(output_dir) / LOCK_FILE
    held: list[RunLock] = []

    def acquire() -> dict:
        held.append(acquire_lock(path))
        return held[0].owner

    owner = decided_by_main(accelerator, acquire)
    with all_or_none(accelerator, failure=lambda error: error, cleanup=lambda: held[0].release()):
        if not accelerator.is_main_process:
            check_sees_lock(path, owner, accelerator.process_index)
    return held[0] if held else RunLock(path, owner)


def acquire_lock(path: Path) -> RunLock:
    """Take the lock at `path` (creating its folder if needed), or raise `OutputDirLockedError`."""
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "run_id": uuid.uuid4().hex}
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock_file(descriptor, path)
        except BaseException:
            os.close(descriptor)
            raise
        if same_file(descriptor, path):
            break
        os.close(descriptor)  # its holder deleted it after we opened it: lock the file now at `path`
    previous = read_owner(descriptor)
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(owner) + "\n").encode(), 0)
    os.fsync(descriptor)
    if previous:
        logger.warning(f"Took over {path} from the run with pid {previous.get('pid')} on host {previous.get('host')} "
                       f"(started {previous.get('started')}), which ended without releasing it.")
    folder = path.parent
    debris = [*remove_debris(folder), *remove_debris(folder / CHECKPOINTS_DIR), *remove_debris(folder / SAMPLES_DIR)]
    if debris:
        logger.warning(f"Removed what interrupted saves left in {folder}: {', '.join(debris)}.")
    return RunLock(path, owner, descriptor, created)


def lock_file(descriptor: int, path: Path):
    """flock `descriptor`, or where there is no flock, refuse if the pid in the file may be alive."""
    if fcntl is not None:
        orphans_gone_by = time.monotonic() + _ORPHAN_SECONDS
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                # A holder that died leaves its lock to the processes it forked (DataLoader workers), which notice
                # and exit within seconds; a live holder is refused at once.
                owner = read_owner(descriptor)
                if may_be_alive(owner) or time.monotonic() > orphans_gone_by:
                    raise OutputDirLockedError(in_use_message(path, owner)) from None
                time.sleep(0.2)
            except OSError as error:
                if error.errno not in _NO_FLOCK:
                    raise
                break
    owner = read_owner(descriptor)
    if owner and may_be_alive(owner):
        raise OutputDirLockedError(in_use_message(path, owner))


def in_use_message(path: Path, owner: dict) -> str:
    pid, host = owner.get("pid", "?"), owner.get("host", "?")
    return (f"--output_dir {path.parent} is in use by another training run: pid {pid} on host {host} (started "
            f"{owner.get('started', '?')}). Two runs writing one output_dir would overwrite each other's checkpoints. "
            f"Wait for it to finish, or stop it (`kill {pid}` on {host}: it saves a checkpoint and exits) and continue "
            "with --resume_from_checkpoint latest, or choose another --output_dir.")


def may_be_alive(owner: dict) -> bool:
    """Whether the process that wrote `owner` may still run (it can only be known for this host)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def same_file(descriptor: int, path: Path) -> bool:
    try:
        opened, named = os.fstat(descriptor), os.stat(path)
    except FileNotFoundError:
        return False
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def read_owner(descriptor: int) -> dict:
    try:
        owner = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def check_sees_lock(path: Path, owner: dict, process_index: int, patience: float = 10.0):
    """Raise `ValueError` unless this process reads, at `path`, the lock the main process wrote (waiting up to
    `patience` seconds for a network file system to show it)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("run_id") == owner["run_id"]:
                return
        except (OSError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    raise ValueError(
        f"Process {process_index} on host {socket.gethostname()} does not see {path}, which the main process wrote "
        f"on host {owner['host']}: --output_dir must be on a file system that every machine shares (NFS, Lustre, "
        "GPFS, ...), because each process writes its RNG states into every checkpoint and reads whole checkpoints "
        "to resume. Point --output_dir at a shared folder."
    )
