"""Training under faults, for real: SIGKILL at random and at exact instants, corrupt and malicious checkpoints, full
disks (RLIMIT_FSIZE), two runs on one output_dir, two machines on localhost, finished runs, out-of-range flags.

The promise tested: whatever kills a run, and whenever, the same command with `--resume_from_checkpoint latest`
continues it, and the finished run is bit-identical to one that was never interrupted. The longer chaos run (20+
kills) is `benchmarks/bench_faults.py`.
"""

import json
import logging
import os
import pickle
import random
import re
import resource
import runpy
import shutil
import signal
import socket
import subprocess
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from huggingface_hub import HfApi
from PIL import Image
from sklearn.datasets import load_digits

import ddpm_hf
from ddpm_hf.hub import HubPushError
from ddpm_hf.training import CorruptCheckpointError, DataConfig, OutputDirLockedError, TrainingConfig, parse_args, train
from ddpm_hf.training.checkpointing import COMPLETE_MARKER, file_sha256, find_checkpoint, verify_checkpoint
from ddpm_hf.training.checks import check_disk_space
from ddpm_hf.training.config import NUMBER_RANGES
from ddpm_hf.training.run_lock import LOCK_FILE, acquire_lock, check_sees_lock

from fault_injection import (check_publishing_order, debris, fingerprint, finish, free_ports, kill_tree, lock_holder,
                             train_process, two_machines, wait_for, worker_of)
from hub_server import LocalHub, use_local_hub
from test_training import assert_same_weights, make_config, saved_weights
from test_training_cli import ENV, QUICK, TRAIN

# The run every test here interrupts: 64 embedded digits, the micro UNet (dropout on), checkpoints every 4 steps.
STEPS, EVERY = 12, 4
FLAGS = [*QUICK, "--max_train_steps", str(STEPS), "--checkpointing_steps", str(EVERY), "--logging_steps", "2",
         "--lr_warmup_steps", "2", "--save_images_steps", "1000", "--resume_from_checkpoint", "latest"]


def run_config(output_dir: Path, **overrides) -> TrainingConfig:
    """FLAGS as a config, for the uninterrupted in-process references."""
    settings = dict(max_train_steps=STEPS, checkpointing_steps=EVERY, logging_steps=2)
    return make_config(output_dir, data={"max_train_samples": 64}, **{**settings, **overrides})


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen]]:
    """Processes to kill, with their children, if the test fails before they end."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            kill_tree(process)


def launch(output_dir: Path, *extra: str, crash_at: str | None = None, **popen) -> subprocess.Popen:
    """The same command line every time (FLAGS), as a scheduler would loop it."""
    return train_process(output_dir, [*FLAGS, *extra], crash_at, **popen)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (every checkpoint kept): the final weights every interrupted run must reach, bit for
    bit. Where strace is installed, it runs under it, and its syscalls are kept beside it (see the power-loss test)."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    if shutil.which("strace") is None:
        train(run_config(output_dir, checkpoints_total_limit=None))
        return output_dir
    traced = train_process(output_dir, [*FLAGS, "--checkpoints_total_limit", "100"],
                           strace_to=output_dir.with_name("syscalls.txt"))
    status, stderr = finish(traced)
    assert status == 0, stderr[-3000:]
    return output_dir


def copy_checkpoints(reference: Path, output_dir: Path) -> Path:
    """A copy of the reference's checkpoints alone: a run stopped at its last checkpoint, not finished."""
    shutil.copytree(reference / "checkpoints", output_dir / "checkpoints")
    return output_dir / "checkpoints"


# --- 1. SIGKILL at random and at exact instants; 5. two runs at once; 7. resuming a finished run --------------------


def test_sigkill_at_any_instant_resumes_to_the_same_weights_and_leaves_nothing_behind(tmp_path, reference, caplog,
                                                                                       launched):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "run"
    # The same command launched twice at once (a scheduler restarting a job that is still alive): whichever
    # locks output_dir first trains; the other must refuse at once, naming it. The first is frozen (SIGSTOP)
    # while the second tries, then SIGKILLed at a random instant after its first checkpoint.
    launches = {process.pid: process for process in (launch(output_dir), launch(output_dir))}
    launched += launches.values()
    first = next(iter(launches.values()))
    wait_for(lambda: lock_holder(output_dir) in launches, first)
    holder = launches[lock_holder(output_dir)]
    holder.send_signal(signal.SIGSTOP)
    (other,) = set(launches.values()) - {holder}
    status, stderr = finish(other)
    assert status == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert f"is in use by another training run: pid {holder.pid} on host {socket.gethostname()}" in stderr
    holder.send_signal(signal.SIGCONT)
    wait_for((output_dir / "checkpoints" / f"checkpoint-{EVERY}").is_dir, holder)
    time.sleep(random.uniform(0, 0.1))
    holder.send_signal(signal.SIGKILL)
    assert finish(holder)[0] == -signal.SIGKILL

    # Exact instants (the benchmark adds more): between a checkpoint's complete temporary folder and its
    # rename, and while the final pipeline's model card is being written.
    for crash_at in ("ddpm_hf.training.durable_io:replace:1", "ddpm_hf.hub.card:write_model_card:1"):
        status, stderr = finish(launch(output_dir, crash_at=crash_at))
        assert status == -signal.SIGKILL, (crash_at, stderr[-3000:])
    status, stderr = finish(launch(output_dir))
    assert status == 0, stderr[-3000:]
    assert f"Took over {output_dir / LOCK_FILE} from the run with pid" in stderr  # the killed run's lock was stale

    assert_same_weights(saved_weights(output_dir), saved_weights(reference))
    assert_same_weights(saved_weights(output_dir, "unet_raw"), saved_weights(reference, "unet_raw"))
    assert debris(output_dir) == []
    for checkpoint in (output_dir / "checkpoints").iterdir():
        verify_checkpoint(checkpoint)

    before = fingerprint(output_dir)
    train(run_config(output_dir, resume_from_checkpoint="latest"))  # the same run, once more: already finished
    assert f"is finished (step {STEPS} of {STEPS})" in caplog.text
    assert fingerprint(output_dir) == before and debris(output_dir) == []


# --- 2. power loss: what makes a rename durable, seen in the syscalls ---------------------------------------------


@pytest.mark.skipif(shutil.which("strace") is None, reason="watches the syscalls with strace")
def test_every_publishing_rename_comes_after_fsync_of_its_files_and_before_fsync_of_its_folder(reference):
    # A power loss cannot be staged in a test; the protocol that makes a checkpoint survive one can be checked:
    # each checkpoint folder, staged pipeline entry and temporary file is renamed only after every file under it
    # and the folder itself were fsynced, and the folder it lands in is fsynced after.
    syscalls = reference.with_name("syscalls.txt").read_text().splitlines()
    checked = check_publishing_order(syscalls, str(reference))
    assert checked["violations"] == []
    # 3 checkpoints, the run record, and the pipeline's 7 entries (its record written through a temporary file too).
    assert checked["publishing_renames_checked"] >= 3 + 1 + 7
    commits = [line for line in syscalls if re.search(r'rename\w*\(.*\.checkpoint-\d+\.tmp", ', line)]
    assert len(commits) == STEPS // EVERY


# --- 3. corrupt checkpoints; 8. untrusted checkpoints ----------------------------------------------------------------


def damage(path: Path, how: str):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "bad JSON":
        path.write_text('{"global_step": 12, ')
    elif how == "deleted":
        path.unlink()


CORRUPTIONS = {  # (file, damage): what the warning must say
    ("model.safetensors", "truncated"): "bytes, but",
    ("optimizer.bin", "zero bytes"): "has 0 bytes",
    ("train_state_0.json", "bad JSON"): "bytes, but",
    ("optimizer.bin", "deleted"): "is missing",
    (COMPLETE_MARKER, "deleted"): "the save of this checkpoint never finished",
    (COMPLETE_MARKER, "bad JSON"): "is not valid JSON",
}


@pytest.mark.parametrize("file, how", list(CORRUPTIONS), ids=[f"{f} {how}" for f, how in CORRUPTIONS])
def test_a_corrupt_checkpoint_is_skipped_by_latest_and_refused_by_name(tmp_path, reference, caplog, file, how):
    PartialState()  # Accelerate's logger, which find_checkpoint warns through, needs it
    checkpoints = copy_checkpoints(reference, tmp_path / "run")
    newest = checkpoints / f"checkpoint-{STEPS}"
    damage(newest / file, how)

    assert find_checkpoint(tmp_path / "run", "latest") == checkpoints / f"checkpoint-{STEPS - EVERY}"
    assert f"Skipping checkpoint-{STEPS}" in caplog.text and f"{newest / file} " in caplog.text
    assert CORRUPTIONS[file, how] in caplog.text
    with pytest.raises(CorruptCheckpointError) as error:
        find_checkpoint(tmp_path / "run", str(newest))
    assert error.value.file == newest / file and "\n" not in str(error.value)
    assert CORRUPTIONS[file, how] in str(error.value) and "--resume_from_checkpoint" in str(error.value)


def test_latest_resumes_from_the_newest_intact_checkpoint_to_the_same_weights(tmp_path, reference):
    checkpoints = copy_checkpoints(reference, tmp_path / "run")
    damage(checkpoints / f"checkpoint-{STEPS}" / "model.safetensors", "truncated")
    train(run_config(tmp_path / "run", resume_from_checkpoint="latest"))
    assert_same_weights(saved_weights(tmp_path / "run"), saved_weights(reference))
    verify_checkpoint(checkpoints / f"checkpoint-{STEPS}")  # retrained and saved again, intact


class Payload:
    """A pickle that, when loaded by an unsafe unpickler, writes a file: proof that code ran."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return exec, (f"open({str(self.canary)!r}, 'w').write('code ran')",)


def plant(path: Path, canary: Path, reseal: bool):
    """Replace `path` with a malicious pickle; with `reseal`, also fix the marker's size and hash (an attacker who
    rewrites the whole checkpoint), so that only refusing to unpickle can catch it."""
    torch.save({"state": Payload(canary)}, path)
    if reseal:
        marker_path = path.parent / COMPLETE_MARKER
        marker = json.loads(marker_path.read_text())
        marker["files"][path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        marker_path.write_text(json.dumps(marker))


CHECKPOINT_FILES = ["ema.safetensors", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin",
                    "train_state_0.json"]


@pytest.mark.parametrize("reseal", [True, False], ids=["marker resealed", "marker kept"])
@pytest.mark.parametrize("file", CHECKPOINT_FILES)
def test_a_malicious_pickle_in_any_checkpoint_file_runs_no_code_and_is_corrupt(tmp_path, reference, file, reseal):
    checkpoints = copy_checkpoints(reference, tmp_path / "run")
    newest, canary = checkpoints / f"checkpoint-{STEPS}", tmp_path / "canary"
    assert sorted(json.loads((newest / COMPLETE_MARKER).read_text())["files"]) == CHECKPOINT_FILES
    plant(newest / file, canary, reseal)

    with pytest.raises(CorruptCheckpointError) as error:
        verify_checkpoint(newest)
    assert error.value.file == newest / file and not canary.exists()
    if reseal and file.endswith((".bin", ".pkl")):
        assert "refused to unpickle: Unsupported global" in str(error.value) and "exec" in str(error.value)
    payload = shutil.copy(newest / file, tmp_path / "payload.pt")  # the payload is real: an unsafe load runs it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(payload, weights_only=True)
    torch.load(payload, weights_only=False)
    assert canary.read_text() == "code ran"


def test_a_file_added_to_a_checkpoint_is_refused_before_accelerate_could_unpickle_it(tmp_path, reference):
    # Accelerate's load_state unpickles custom_checkpoint_*.pkl with weights_only=False; ours never holds one.
    newest = copy_checkpoints(reference, tmp_path / "run") / f"checkpoint-{STEPS}"
    plant(newest / "custom_checkpoint_0.pkl", tmp_path / "canary", reseal=False)
    with pytest.raises(CorruptCheckpointError, match="custom_checkpoint_0.pkl was not part of the saved checkpoint"):
        verify_checkpoint(newest)
    assert not (tmp_path / "canary").exists()


# --- 4. full disks ------------------------------------------------------------------------------------------------


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A real RLIMIT_FSIZE on this process: a write past `limit` bytes fails with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("what, extra, limit", [
    # The optimizer state (474 kB) no longer fits; the model (194 kB) still does, so the save fails midway.
    ("checkpoint checkpoint-14", ["--checkpointing_steps", "2"], 300_000),
    # No checkpoint before the end; the pipeline's weights (194 kB) do not fit.
    ("the pipeline", ["--checkpointing_steps", "1000"], 150_000),
])
def test_a_full_disk_is_a_clear_error_and_loses_nothing(tmp_path, reference, caplog, what, extra, limit):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)  # a finished run, trained further (--max_train_steps 16)
    before = fingerprint(output_dir)
    train_main = runpy.run_path(str(TRAIN))["main"]  # examples/train.py, in this process: its exit status

    with file_size_limit(limit):
        status = train_main([*FLAGS, "--output_dir", str(output_dir), "--max_train_steps", "16", *extra])

    assert status == 1
    folder = output_dir / "checkpoints" if what.startswith("checkpoint") else output_dir
    (error,) = [record.message for record in caplog.records if record.levelno == logging.ERROR]
    assert error.startswith(f"Could not save {what} in {folder}: a file would grow past the file-size limit of "
                            f"{limit / 1000:.1f} kB ({limit:,} bytes) (`ulimit -f`). It needs about ")
    assert "\n" not in error and "older checkpoints and the saved pipeline are intact" in error
    assert fingerprint(output_dir) == before  # every older checkpoint and the pipeline, untouched
    assert debris(output_dir) == []  # the unfinished save is gone


def test_a_nearly_full_disk_is_warned_about_before_training(tmp_path, caplog):
    PartialState()
    config = run_config(tmp_path / "run")
    (tmp_path / "run").mkdir()
    free = shutil.disk_usage(tmp_path).free
    check_disk_space(config, checkpoint_bytes=free // 2, pipeline_bytes=1000)
    assert f"--output_dir {tmp_path / 'run'} has" in caplog.text and "it may stop with an error" in caplog.text
    caplog.clear()
    check_disk_space(config, checkpoint_bytes=1000, pipeline_bytes=1000)
    assert caplog.text == ""


# --- 5. the lock ----------------------------------------------------------------------------------------------------


def test_a_held_lock_is_refused_naming_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    PartialState()
    path = tmp_path / "run" / LOCK_FILE
    held = acquire_lock(path)
    with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        acquire_lock(path)  # a second open of the file, as another process would: refused
    os.close(held.descriptor)  # the holder dies (its lock goes with it; the file stays, naming it)

    taken = acquire_lock(path)
    assert f"Took over {path} from the run with pid {os.getpid()}" in caplog.text
    assert json.loads(path.read_text())["run_id"] == taken.owner["run_id"] != held.owner["run_id"]
    taken.release()
    assert not path.exists()


def test_a_process_that_does_not_see_the_output_dir_is_told_it_must_be_shared(tmp_path):
    owner = {"run_id": "0123", "host": "node-0"}
    with pytest.raises(ValueError, match="must be on a file system that every machine shares"):
        check_sees_lock(tmp_path / LOCK_FILE, owner, process_index=1, patience=0)


# --- 6. two machines ----------------------------------------------------------------------------------------------


def test_two_machines_stop_together_on_sigterm_and_resume_to_the_same_weights(tmp_path, launched):
    long = ["--max_train_steps", "40"]  # long enough to be stopped midway
    ports = free_ports(3)
    reference = two_machines(tmp_path / "uninterrupted", ports[0], [*FLAGS, *long])
    stopped = two_machines(tmp_path / "run", ports[1], [*FLAGS, *long])
    launched += reference + stopped
    node_1 = worker_of(stopped[1])
    wait_for((tmp_path / "run" / "checkpoints" / f"checkpoint-{EVERY}").is_dir, stopped[0])
    node_1.send_signal(signal.SIGTERM)  # a preemption notice to one machine only
    results = [finish(launcher) for launcher in stopped]
    assert [status for status, _ in results] == [0, 0], [stderr[-2000:] for _, stderr in results]
    assert "Stopped by a signal to another process" in results[0][1]
    states = [json.loads(path.read_text()) for path in (tmp_path / "run" / "checkpoints").glob("*/train_state_*")]
    newest = max(state["global_step"] for state in states)
    assert EVERY < newest < 40 and not (tmp_path / "run" / "model_index.json").exists()
    both = [state for state in states if state["global_step"] == newest]
    assert len(both) == 2 and both[0]["weights_sha256"] == both[1]["weights_sha256"]  # the same step, the same weights

    launched += (resuming := two_machines(tmp_path / "run", ports[2], [*FLAGS, *long]))
    resumed = [finish(launcher) for launcher in resuming]
    assert [status for status, _ in resumed] == [0, 0], [stderr[-2000:] for _, stderr in resumed]
    assert f"at step {newest}" in resumed[0][1]
    assert [finish(launcher)[0] for launcher in reference] == [0, 0]
    for component in ("unet", "unet_raw"):
        assert_same_weights(saved_weights(tmp_path / "run", component), saved_weights(tmp_path / "uninterrupted",
                                                                                       component))


def test_the_process_group_ends_after_the_ddp_model_through_a_backend_handle(tmp_path):
    """The teardown that stopped the hang at exit (ddpm_hf/training/teardown.py), in two real processes: the DDP
    model that the caller let go of is gone, the group is destroyed, and the backend handle that the group ends
    with exists (a private PyTorch API: if it vanished, the fix would silently do nothing)."""
    worker = Path(__file__).with_name("teardown_worker.py")
    launch = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
                             "--dynamo_backend", "no", str(worker), str(tmp_path)],
                            env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=240)
    assert launch.returncode == 0, launch.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert reports == [{"rank": rank, "ddp": True, "backends": ["ProcessGroupGloo"], "model_freed": True,
                        "group_destroyed": True} for rank in (0, 1)]


# --- bad images: skipped, and counted where the run is described ---------------------------------------------------


def test_skipped_images_are_counted_in_the_run_record(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(load_digits().images[:16]):
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{index:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing")
    train(make_config(tmp_path / "run", folder, max_train_steps=2, data={"skip_bad_images": True}))
    assert json.loads((tmp_path / "run" / "training_config.json").read_text())["skipped_images"] == 1


# --- bad numbers ----------------------------------------------------------------------------------------------------


def numeric_flags() -> list[tuple[str, type]]:
    """Every int or float field of the configs (X | None too), with its number type."""
    found = []
    for cls in (DataConfig, TrainingConfig):
        for name, hint in typing.get_type_hints(cls).items():
            kinds = [arg for arg in typing.get_args(hint) or (hint,) if arg in (int, float)]
            if kinds and name in {f.name for f in fields(cls)}:
                found.append((name, kinds[0]))
    return found


ZERO_ALLOWED = {name for name, (low, allowed, _, _) in NUMBER_RANGES.items() if low == 0 and allowed} | {
    "shuffle_buffer_size"}


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_every_numeric_flag_refuses_zero_negative_nan_and_inf_in_one_line(value, capsys):
    flags = numeric_flags()
    assert len(flags) >= 25 and ("learning_rate", float) in flags and ("resolution", int) in flags
    for name, kind in flags:
        if value == "0" and name in ZERO_ALLOWED:
            parse_args([f"--{name}", value])  # 0 means something here (seed 0, no warmup, no weight decay, ...)
            continue
        with pytest.raises(SystemExit) as exit_info:
            parse_args([f"--{name}", value])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and f"--{name}" in lines[0], (name, value, lines)


# --- 9. the Hub: a failed push at the end, finished by running the same command again --------------------------------


def test_rerunning_a_run_whose_end_push_failed_uploads_it_in_one_commit(tmp_path, monkeypatch):
    token = "hf_test_alice_4f1c9e2b7d"
    monkeypatch.setattr(ddpm_hf.hub.push, "RETRY_DELAYS_SECONDS", (0.01,) * 4)
    config = run_config(tmp_path / "ddpm-run", max_train_steps=2, push_to_hub=True, hub_token=token,
                        resume_from_checkpoint="latest")
    with LocalHub(tmp_path / "hub", tokens={token: "alice"}) as hub:
        use_local_hub(monkeypatch, hub.url, home=tmp_path / "hf_home")
        api = HfApi(token=token)
        hub.fail_next("commit", times=5, status=503)  # the Hub is down for the whole end push
        with pytest.raises(HubPushError, match="Run the same push again"):
            train(config)
        assert [commit.title for commit in api.list_repo_commits("alice/ddpm-run")] == ["initial commit"]

        train(config)  # the same command: the run is finished, so it only pushes
        titles = [commit.title for commit in api.list_repo_commits("alice/ddpm-run")]
        train(config)  # and again: nothing is missing, so nothing is committed
        assert [commit.title for commit in api.list_repo_commits("alice/ddpm-run")] == titles
        uploaded = set(api.list_repo_files("alice/ddpm-run"))
    assert titles == ["Trained for 2 steps with ddpm_hf", "initial commit"]
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= uploaded
