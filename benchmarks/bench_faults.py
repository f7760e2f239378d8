"""Training under faults, at length: many SIGKILLs at random and at exact instants, a full disk, two machines,
and what fsync costs per checkpoint. The short versions of each are in tests/test_training_faults.py.

    python benchmarks/bench_faults.py                       # all parts, 24 kills (~15 min on two busy CPU cores)
    python benchmarks/bench_faults.py --kills 40 --seed 3
    python benchmarks/bench_faults.py --parts fsync --dir /data/ckpt    # fsync where your checkpoints live
    python benchmarks/bench_faults.py --parts stops --stops 100          # does a two-machine stop ever hang at exit?

chaos  One run (the micro UNet on 64 digits, 40 steps, a checkpoint every 4, the newest 2 kept) launched again and
       again with the same command line (`--resume_from_checkpoint latest`, as a scheduler loops a job) and SIGKILLed:
       at a random instant of its life (start-up, training, saving), or at an exact one, taken in turn: inside
       save_state, before a checkpoint's completion marker, between its complete temporary folder and the rename,
       while an old checkpoint is deleted, before and in the middle of publishing the final pipeline, while the model
       card is written. A run that ends before its kill starts a new round. Reported: kills survived, whether every
       round ended bit-identical (EMA and raw weights) to an uninterrupted run, and what was left behind.
disk   A 3 MB tmpfs (mounted in a user and mount namespace, `unshare -rm`, where the system allows it): a run that
       fits, then the same run trained further until the disk is full. Reported: the exit status, the error, whether
       the pre-flight check warned, whether the older checkpoints and the pipeline are intact, what was left behind.
nodes  Two `accelerate launch` machines on localhost (gloo): an uninterrupted run; a run whose node-1 worker gets
       SIGTERM, resumed; a run whose node-1 launcher gets SIGTERM (torchrun passes it on), resumed; a node 1 that
       writes to a folder the main node does not share. Reported: exit statuses, stop steps, bit-identity.
stops  --stops two-machine runs in a row, each stopped by SIGTERM to node 1's worker after its first checkpoint,
       beside --load busy processes (not a default part: about 20 s a stop). A launcher still running 90 s after
       the signal is a hang, reported with every process's stack (py-spy, if installed). It found the gloo teardown
       deadlock that ddpm_hf/training/teardown.py fixes: 3 hangs in 60 stops with 3 busy processes before the fix.
power  A power loss cannot be staged here; what makes a rename survive one can be watched: a run under strace,
       whose every publishing rename (of a temporary checkpoint folder, staged pipeline entry or temporary file)
       must come after an fsync of each file under it and of the folder, and be followed by an fsync of the
       folder it lands in. Reported: the renames checked and any order broken. (The same check is in the tests.)
fsync  `save_checkpoint` of the `tiny` UNet (the README main job's: 1.1M parameters, 18 MB a checkpoint), with
       and without fsync, interleaved; and the fsync of a saved pipeline. Measured on --dir (default: a temporary
       folder). The main job saves 2 checkpoints and 1 pipeline in about 345 s.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import psutil
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import Clock, interleave  # noqa: E402
from fault_injection import (check_publishing_order, debris, fingerprint, finish, free_ports, kill_tree,  # noqa: E402
                             train_process, two_machines, wait_for, worker_of)
from test_training_cli import QUICK  # noqa: E402

from ddpm_hf.training.checkpointing import list_checkpoints, verify_checkpoint  # noqa: E402

STEPS, EVERY = 40, 4
FLAGS = [*QUICK, "--max_train_steps", str(STEPS), "--checkpointing_steps", str(EVERY), "--logging_steps", "4",
         "--lr_warmup_steps", "2", "--save_images_steps", "1000", "--resume_from_checkpoint", "latest"]
# Exact instants, as crash_at.py targets: (what, "module:function:N"); N may depend on the checkpoints the launch
# commits. The first five need a checkpoint to save, the others happen in the final save.
EXACT_KILLS = [
    ("in save_state, before the optimizer state", lambda commits: "torch.serialization:save:1"),
    ("in save_state, before the RNG states", lambda commits: "torch.serialization:save:3"),
    ("before the completion marker", lambda commits: "ddpm_hf.training.checkpointing:write_complete_marker:1"),
    ("between the temporary folder and the rename", lambda commits: "ddpm_hf.training.durable_io:replace:1"),
    ("while deleting an old checkpoint", lambda commits: "ddpm_hf.training.durable_io:remove_folder:1"),
    ("before publishing the pipeline", lambda commits: "ddpm_hf.training.outputs:publish:1"),
    ("halfway through publishing the pipeline", lambda commits: f"ddpm_hf.training.durable_io:replace:{commits + 4}"),
    ("while writing the model card", lambda commits: "ddpm_hf.hub.card:write_model_card:1"),
]


def weights(output_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(output_dir / folder / "diffusion_pytorch_model.safetensors") for folder in ("unet", "unet_raw")]


def identical(a: Path, b: Path) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(weights(a), weights(b)))


def all_intact(output_dir: Path) -> bool:
    try:
        return all(verify_checkpoint(checkpoint) for checkpoint in list_checkpoints(output_dir))
    except ValueError:
        return False


def latest_intact_step(output_dir: Path) -> int:
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(checkpoint)
            return int(checkpoint.name.split("-")[1])
        except ValueError:
            continue
    return 0


# --- chaos ----------------------------------------------------------------------------------------------------------


def chaos(folder: Path, kills: int, rng: random.Random) -> dict:
    started = time.perf_counter()
    status, stderr = finish(train_process(folder / "reference", FLAGS))
    assert status == 0, stderr[-3000:]
    lifetime = time.perf_counter() - started
    rounds, killed, pending = [], [], []
    while len(killed) < kills:
        run = folder / f"round-{len(rounds)}"
        log = []
        while True:
            resumes_at = latest_intact_step(run)
            if len(killed) < kills and len(killed) % 2 == 0:
                delay = rng.uniform(0, lifetime)
                how, process = f"at a random instant, {delay:.2f} s after the start", train_process(run, FLAGS)
                try:
                    process.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
            elif len(killed) < kills:
                # Every instant in turn; past the last checkpoint, only those of the final save can come.
                fits = [kill for kill in pending if resumes_at < STEPS or EXACT_KILLS.index(kill) >= 5]
                if not fits:
                    pending += EXACT_KILLS
                    fits = [kill for kill in pending if resumes_at < STEPS or EXACT_KILLS.index(kill) >= 5]
                what, target = fits[0]
                pending.remove(fits[0])
                crash_at = target((STEPS - resumes_at) // EVERY)
                how, process = f"{what} ({crash_at})", train_process(run, FLAGS, crash_at=crash_at)
            else:
                how, process = "not killed", train_process(run, FLAGS)
            status, stderr = finish(process)
            log.append({"resumed_at_step": resumes_at, "kill": how, "status": status,
                        "found_it_finished": "is finished (step" in stderr})  # a kill after the pipeline was saved
            if status == -signal.SIGKILL:
                killed.append(how)
                continue
            assert status == 0, stderr[-3000:]
            break
        leftovers = [str(path.relative_to(run)) for path in debris(run)]
        rounds.append({"launches": log, "bit_identical": identical(run, folder / "reference"),
                       "left_behind": leftovers, "checkpoints_intact": all_intact(run)})
    kinds = sorted({how.split(",")[0].split(" (")[0] for how in killed})
    by_instant = {kind: sum(how.startswith(kind) for how in killed) for kind in kinds}
    return {"kills": len(killed), "kills_by_instant": by_instant,
            "kills_survived": sum(len([x for x in r["launches"] if x["status"] < 0])
                                                        for r in rounds if r["bit_identical"]),
            "all_bit_identical": all(r["bit_identical"] for r in rounds), "rounds": rounds,
            "uninterrupted_run_s": round(lifetime, 1)}


# --- disk -----------------------------------------------------------------------------------------------------------


def disk(folder: Path) -> dict:
    """Re-run this script as `unshare -rm` (root in a user and mount namespace) to mount a small tmpfs there."""
    if shutil.which("unshare") is None:
        return {"skipped": "no unshare"}
    result = folder / "disk.json"
    command = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, __file__, "--disk-inside",
               str(folder)]
    inside = subprocess.run(command, capture_output=True, text=True)
    if not result.is_file():
        return {"skipped": f"could not mount a tmpfs in a namespace: {inside.stderr.strip()[-500:]}"}
    return json.loads(result.read_text())


def disk_inside(folder: Path):
    mount = folder / "tmpfs"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    run = mount / "run"
    status, stderr = finish(train_process(run, [*FLAGS, "--max_train_steps", "12"]))
    report = {"first_run_status": status}
    if status == 0:
        # Shrink the disk to what the finished run holds, plus half a checkpoint: the next checkpoint cannot fit.
        checkpoint = sum(path.stat().st_size for path in list_checkpoints(run)[-1].iterdir())
        size = shutil.disk_usage(mount).used + checkpoint // 2
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)
        report.update(tmpfs_bytes=shutil.disk_usage(mount).total, free_bytes=shutil.disk_usage(mount).free)
        before = fingerprint(run)
        status, stderr = finish(train_process(run, [*FLAGS, "--checkpointing_steps", "2"]))
        after = fingerprint(run)
        report.update(
            status=status,
            error=next((line.split(" train: ", 1)[1] for line in stderr.splitlines() if " ERROR train: " in line),
                       None),
            preflight_warning=next((line[line.index("--output_dir"):] for line in stderr.splitlines()
                                    if "free, but this run writes about" in line), None),
            older_files_intact=all(after.get(name) == value for name, value in before.items()),
            left_behind=[str(path.relative_to(run)) for path in debris(run)],
            traceback="Traceback" in stderr,
        )
    (folder / "disk.json").write_text(json.dumps(report))


# --- nodes ----------------------------------------------------------------------------------------------------------


def nodes(folder: Path) -> dict:
    launched = []
    try:
        return two_machine_cases(folder, launched)
    finally:
        for process in launched:
            if process.poll() is None:
                kill_tree(process)


def two_machine_cases(folder: Path, launched: list[subprocess.Popen]) -> dict:
    ports = free_ports(6)
    launched += (reference := two_machines(folder / "reference", ports[0], FLAGS))
    report = {}
    for case, port, resume_port in (("worker", ports[1], ports[2]), ("launcher", ports[3], ports[4])):
        run = folder / f"sigterm-{case}"
        launched += (launchers := two_machines(run, port, FLAGS))
        workers = [worker_of(launcher) for launcher in launchers]
        wait_for((run / "checkpoints" / f"checkpoint-{EVERY}").is_dir, launchers[0])
        (workers[1] if case == "worker" else launchers[1]).send_signal(signal.SIGTERM)
        psutil.wait_procs(workers, timeout=240)
        stopped = [launcher_status(launcher) for launcher in launchers]
        states = [json.loads(path.read_text()) for path in run.glob("checkpoints/*/train_state_*.json")]
        stop_step = max(state["global_step"] for state in states)
        agree = [state["weights_sha256"] for state in states if state["global_step"] == stop_step]
        launched += (resuming := two_machines(run, resume_port, FLAGS))
        resumed = [finish(launcher)[0] for launcher in resuming]
        report[f"sigterm_{case}"] = {
            "launcher_statuses": stopped, "stop_step": stop_step,
            "both_saved_the_stop_step_with_equal_weights": len(agree) == 2 and agree[0] == agree[1],
            "resumed_statuses": resumed, "run": run}
    assert [finish(launcher)[0] for launcher in reference] == [0, 0]
    for case in report.values():
        case["bit_identical"] = identical(case.pop("run"), folder / "reference")
    launched += (unsharing := two_machines(folder / "main", ports[5], FLAGS, folder / "elsewhere"))
    unshared = [finish(launcher) for launcher in unsharing]
    report["unshared_output_dir"] = {
        "statuses": [status for status, _ in unshared],
        "error": next((line for line in unshared[0][1].splitlines() if "must be on a file system" in line), None)}
    return report


def launcher_status(launcher: subprocess.Popen, patience: float = 30) -> int | str:
    """The exit status of a launcher whose worker has ended, or what holds it (torchrun's exit barrier waits 300 s
    for the agents of all machines, and an agent that died of the signal never comes)."""
    try:
        return launcher.wait(timeout=patience)
    except subprocess.TimeoutExpired:
        kill_tree(launcher)
        return f"still running {patience:g} s after its worker ended (torchrun's exit barrier); killed"


def stops(folder: Path, count: int, load: int) -> dict:
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    outcomes = []
    try:
        for index in range(count):
            run = folder / f"stop-{index}"
            launchers = two_machines(run, free_ports(1)[0], FLAGS)
            try:
                outcomes.append(stop_once(run, launchers))
            finally:
                for launcher in launchers:
                    if launcher.poll() is None:
                        kill_tree(launcher)
                shutil.rmtree(run, ignore_errors=True)
            print(f"stop {index + 1}/{count}: {outcomes[-1]['outcome']}", flush=True)
    finally:
        for burner in burners:
            burner.kill()
    exited = [outcome for outcome in outcomes if outcome["outcome"] == "exited"]
    seconds = sorted(outcome["seconds"] for outcome in exited)
    return {"stops": count, "busy_processes": load,
            "hung": [index for index, outcome in enumerate(outcomes) if outcome["outcome"] == "hung"],
            "failed_starts": [index for index, outcome in enumerate(outcomes) if outcome["outcome"] == "failed start"],
            "all_others_exited_0": all(outcome["statuses"] == [0, 0] for outcome in exited),
            "median_exit_seconds": round(seconds[len(seconds) // 2], 1) if seconds else None,
            "stacks_of_hangs": [outcome["stacks"] for outcome in outcomes if outcome["outcome"] == "hung"]}


def stop_once(run: Path, launchers: list[subprocess.Popen], patience: float = 90) -> dict:
    """SIGTERM to node 1's worker once the first checkpoint is written, then wait `patience` s for both machines."""
    try:
        node_1 = worker_of(launchers[1])
        wait_for((run / "checkpoints" / f"checkpoint-{EVERY}").is_dir, launchers[0])
        node_1.send_signal(signal.SIGTERM)
    except (psutil.NoSuchProcess, RuntimeError):  # a launch that failed or ended before the signal: not a stop
        return {"outcome": "failed start"}
    signalled = time.monotonic()
    for launcher in launchers:  # communicate: stderr is a pipe, which must not fill up
        try:
            launcher.communicate(timeout=max(0.0, signalled + patience - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    if any(launcher.poll() is None for launcher in launchers):
        return {"outcome": "hung", "stacks": [stacks(launcher) for launcher in launchers]}
    return {"outcome": "exited", "seconds": time.monotonic() - signalled,
            "statuses": [launcher.returncode for launcher in launchers]}


def stacks(launcher: subprocess.Popen) -> str:
    """The native and Python stacks of `launcher` and everything under it (py-spy), or why there are none."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed (pip install py-spy)"
    try:
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return "ended meanwhile"
    return "\n".join(subprocess.run(["py-spy", "dump", "--native", "--pid", str(process.pid)], capture_output=True,
                                    text=True).stdout for process in tree)


# --- power ----------------------------------------------------------------------------------------------------------

def power(folder: Path) -> dict:
    if shutil.which("strace") is None:
        return {"skipped": "no strace"}
    folder.mkdir(parents=True)
    trace = folder / "syscalls.txt"
    flags = [*FLAGS, "--max_train_steps", "12", "--checkpoints_total_limit", "100"]  # every published folder stays
    status, _ = finish(train_process(folder / "run", flags, strace_to=trace))
    return {"status": status, **check_publishing_order(trace.read_text().splitlines(), str(folder / "run"))}


# --- fsync ----------------------------------------------------------------------------------------------------------


def fsync_cost(folder: Path, rounds: int) -> dict:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel
    from ddpm_hf.training.checkpointing import Progress, checkpoint_bytes, file_sha256, save_checkpoint
    from ddpm_hf.training.durable_io import fsync_tree
    from ddpm_hf.training.presets import load_unet_config

    accelerator = Accelerator(cpu=True)
    unet = UNet2DModel(**load_unet_config("tiny"), in_channels=1, out_channels=1, sample_size=16)
    optimizer = torch.optim.AdamW(unet.parameters())
    unet(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])).sample.mean().backward()
    optimizer.step()  # AdamW's moments exist, as in any checkpoint after the first step
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
    ema = EMAModel(unet.parameters())
    names = [name for name, _ in unet.named_parameters()]
    progress = Progress(global_step=0)
    dataset = torch.utils.data.TensorDataset(torch.zeros(1))

    def save():
        progress.global_step += 1
        save_checkpoint(accelerator, folder, progress, {}, dataset, ema, names, 1, checkpoint_bytes(unet, True))

    def save_without_fsync():
        with mock.patch("os.fsync"):
            save()

    timings = interleave({"with fsync": save, "without fsync": save_without_fsync}, rounds, Clock(torch.device("cpu")))
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipeline_s = []
    for index in range(rounds):
        staging = folder / f"pipeline-{index}"
        pipeline.save_pretrained(staging)
        unet.save_pretrained(staging / "unet_raw")
        start = time.perf_counter()
        fsync_tree(staging)
        pipeline_s.append(time.perf_counter() - start)
        shutil.rmtree(staging)
    (checkpoint,) = list_checkpoints(folder)
    clock = Clock(torch.device("cpu"))
    hashing_s = clock.time(lambda: [file_sha256(path) for path in checkpoint.iterdir()])
    verifying_s = clock.time(lambda: verify_checkpoint(checkpoint))
    with_fsync, without = timings["with fsync"].median_s, timings["without fsync"].median_s
    pipeline_fsync = sorted(pipeline_s)[len(pipeline_s) // 2]
    main_job = 2 * (with_fsync - without) + pipeline_fsync
    return {"folder": str(folder), "checkpoint_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
            "checkpoint_save_ms_with_fsync": round(with_fsync * 1e3, 1),
            "checkpoint_save_ms_without_fsync": round(without * 1e3, 1),
            "fsync_ms_per_checkpoint": round((with_fsync - without) * 1e3, 1),
            "fsync_ms_per_pipeline": round(pipeline_fsync * 1e3, 1),
            "sha256_ms_per_checkpoint": round(hashing_s * 1e3, 1), "verify_ms_on_resume": round(verifying_s * 1e3, 1),
            "main_job_overhead_s": round(main_job, 3), "main_job_overhead_percent": round(100 * main_job / 345, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["chaos", "disk", "nodes", "power", "fsync"],
                        choices=["chaos", "disk", "nodes", "stops", "power", "fsync"])
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs in the chaos part (default: 24)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random kill instants")
    parser.add_argument("--stops", type=int, default=40, help="two-machine stops in the stops part (default: 40)")
    parser.add_argument("--load", type=int, default=3, help="busy processes beside the stops part (default: 3)")
    parser.add_argument("--rounds", type=int, default=10, help="timed saves each way in the fsync part")
    parser.add_argument("--dir", type=Path, help="where the fsync part saves (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the report there")
    parser.add_argument("--disk-inside", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.disk_inside:
        return disk_inside(args.disk_inside)
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for part in args.parts:
            started = time.perf_counter()
            if part == "chaos":
                report[part] = chaos(scratch / part, args.kills, random.Random(args.seed))
            elif part == "disk":
                report[part] = disk(scratch / part)
            elif part == "nodes":
                report[part] = nodes(scratch / part)
            elif part == "stops":
                report[part] = stops(scratch / part, args.stops, args.load)
            elif part == "power":
                report[part] = power(scratch / part)
            else:
                folder = Path(tempfile.mkdtemp(dir=args.dir)) if args.dir else scratch / part
                report[part] = fsync_cost(folder, args.rounds)
                if args.dir:
                    shutil.rmtree(folder)
            report[part]["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{part}: {json.dumps(report[part], indent=2, default=str)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
