"""Running examples/train.py as users do, and breaking it: for tests/test_training_faults.py and
benchmarks/bench_faults.py.

Processes: one run (`train_process`), SIGKILLed at an exact instant through `crash_at.py`, or two machines on
localhost (`two_machines`: two `accelerate launch` with gloo). On disk: what a run leaves behind (`debris`), and
a `fingerprint` that shows any file rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ddpm_hf.training.durable_io import TEMPORARY_SUFFIXES
from ddpm_hf.training.run_lock import LOCK_FILE

from test_training_cli import ENV, TRAIN

CRASH_AT = Path(__file__).with_name("crash_at.py")
TRACED_CALLS = ("rename", "renameat", "renameat2", "fsync")
SYSCALL = re.compile(r'^\d+\s+(?P<call>rename|renameat2?|fsync)\((?P<args>.*)\)\s+= 0')  # the calls that succeeded


def train_process(output_dir: Path, flags: list[str], crash_at: str | None = None, strace_to: Path | None = None,
                  **popen) -> subprocess.Popen:
    """examples/train.py with `flags` into `output_dir`; `crash_at` ("module:function:N") SIGKILLs it at that call;
    `strace_to` records its file-system syscalls there (see `check_publishing_order`)."""
    command = [sys.executable, str(TRAIN), *flags, "--output_dir", str(output_dir)]
    env = dict(ENV)
    if crash_at is not None:
        command.insert(1, str(CRASH_AT))
        env["CRASH_AT"] = crash_at
    if strace_to is not None:
        command = ["strace", "-f", "-qq", "-y", "-e", f"trace={','.join(TRACED_CALLS)}", "-e", "signal=none", "-o",
                   str(strace_to), *command]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def two_machines(output_dir: Path, port: int, flags: list[str], output_dir_1: Path | None = None
                 ) -> list[subprocess.Popen]:
    """Two `accelerate launch` machines on localhost (one CPU process each, gloo), as a two-node cluster runs them;
    machine 1 writes to `output_dir_1` if given (a node that does not share the main node's folder)."""
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    return [subprocess.Popen(
        ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
         "127.0.0.1", "--main_process_port", str(port), "--num_processes", "2", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(TRAIN), *flags, "--output_dir", str(folder)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank, folder in enumerate((output_dir, output_dir_1 or output_dir))]


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for `process`: its exit status and stderr. One that hangs is killed with its children, and raises."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise RuntimeError(f"{process.args} hung; its stderr ends with:\n{process.communicate()[1][-3000:]}") from None
    return process.returncode, stderr


def kill_tree(process: subprocess.Popen):
    """SIGKILL `process` and everything it started."""
    try:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
    except psutil.NoSuchProcess:
        pass
    process.kill()


def worker_of(launcher: subprocess.Popen) -> psutil.Process:
    """The training process that an `accelerate launch` started (torchrun's worker, below the launcher)."""
    deadline = time.monotonic() + 120
    while not (workers := [child for child in psutil.Process(launcher.pid).children(recursive=True)
                           if str(TRAIN) in command_line(child)]):
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{launcher.args} started no worker")
        time.sleep(0.05)
    return workers[0]


def command_line(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # it ended meanwhile
        return []


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (held open together while they are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_for(condition, process: subprocess.Popen, timeout: float = 180, poll: float = 0.005):
    """Poll `condition()` until true, while `process` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args} ended or stalled first:\n{finish(process)[1][-3000:]}")
        time.sleep(poll)


def lock_holder(output_dir: Path) -> int | None:
    """The pid in output_dir's lock file, once a run has written it."""
    try:
        return json.loads((output_dir / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: its sha256 and modification time (a rewrite with the same bytes shows too)."""
    return {path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                  path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def debris(folder: Path) -> list[Path]:
    """What interrupted saves leave: temporary names, and the lock of a run that did not end cleanly."""
    return [path for path in folder.rglob(".*") if path.name.endswith(TEMPORARY_SUFFIXES) or path.name == LOCK_FILE]


def check_publishing_order(lines: list[str], output_dir: str) -> dict:
    """Replay a finished run's syscalls (`strace_to`): each rename that publishes something (a temporary checkpoint
    folder, a staged pipeline entry, a temporary file) must come after an fsync of every file it holds (as found
    where it landed) and of the folder, and be followed by an fsync of the folder it lands in before any rename
    elsewhere (the entries of one pipeline land in one folder, fsynced after the last)."""
    synced, unsynced_parents, violations, checked = set(), {}, [], 0
    for line in lines:
        if not (match := SYSCALL.match(line)) or output_dir not in line:
            continue
        if match["call"] == "fsync":
            path = re.search(r"<(.+)>", match["args"]).group(1)
            synced.add(path)
            unsynced_parents.pop(path, None)
            continue
        source, target = re.findall(r'"([^"]+)"', match["args"])[-2:]
        name, parent = os.path.basename(source), os.path.dirname(source)
        inside_staging = parent.endswith(".tmp") and os.path.dirname(target) == parent  # fsynced when published
        if inside_staging or not ((name.startswith(".") and name.endswith(".tmp")) or parent.endswith(".final.tmp")):
            continue  # a rename inside a folder that is published later, or a folder moved aside
        checked += 1
        staged_entry = parent.endswith(".final.tmp")  # the entries of one pipeline, fsynced after the last
        pending = {folder: earlier for folder, earlier in unsynced_parents.items()
                   if not (staged_entry and os.path.dirname(earlier).endswith(".final.tmp"))}
        violations += [f"{folder} not fsynced after {earlier} was renamed into it, before the next rename"
                       for folder, earlier in pending.items()]
        unsynced_parents = {folder: earlier for folder, earlier in unsynced_parents.items() if folder not in pending}
        held = [os.path.join(source, path.relative_to(target)) for path in Path(target).rglob("*")]
        missing = [path for path in [source, *held] if path not in synced]
        if missing:
            violations.append(f"{source} renamed before fsync of {', '.join(sorted(missing)[:3])}")
        unsynced_parents[os.path.dirname(target)] = source
    violations += [f"{folder} not fsynced after {source} was renamed into it" for folder, source in
                   unsynced_parents.items()]
    return {"publishing_renames_checked": checked, "violations": violations, "protocol_kept": not violations}
