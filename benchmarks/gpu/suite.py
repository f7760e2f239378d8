"""The GPU suite: everything ddpm_hf claims on a GPU, measured in one command under a hard time budget.

    bash benchmarks/gpu/run.sh                              # on the device machine (installs the carried wheels)
    python benchmarks/gpu/suite.py --device cpu --smoke     # here: every part on tiny configs, in a minute or two

Parts, each in its own process with its own time cap (what a part leaves unused goes to the next ones; a part that
runs past its cap is killed and keeps what it recorded), each skipping what no longer fits and saying so:

    1 environment   GPU, driver, torch/CUDA/cuDNN and library versions; the measured bf16 matmul rate (MFU's base)
    2 correctness   pytest -m cuda: ddpm_hf against diffusers on CUDA, the CUDA-graph step, low-precision training
    3 sampling      images/s of the CIFAR-10 network, ddpm_hf plain and fast against diffusers eager and fast
    4 training      images/s of the real training step against a diffusers train_unconditional step
    5 real_run      examples/train.py in bf16: stop, resume, sample, load in diffusers

They run in the order 1, 2, 5, 3, 4 (the elastic, compile-heavy parts last). Results go to gpu_results.json
and gpu_results.md (a table for the README) in $OUT when set (the device machine), else --out or the current
folder, and the table is printed. A part's failure is recorded and the suite goes on. Exit status: 0 when every
part ran (whatever the numbers), 1 when a part failed or timed out, 2 for bad input (no CUDA without --device cpu).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common.py, bench_*.py

import torch  # noqa: E402

from context import Budget, PartContext  # noqa: E402
from report import render_markdown, summarise  # noqa: E402

# Part name -> (seconds of the default budget on a GPU, under --smoke), in the order they run.
PARTS = {
    "environment": (15, 30),
    "correctness": (75, 90),
    "real_run": (85, 90),
    "sampling": (160, 45),
    "training": (105, 45),
}
GRACE_S = {False: 10, True: 5}  # past its cap a part is killed: on a GPU, or under --smoke


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default; the suite refuses to run without a GPU) or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny configs and budgets, no torch.compile: checks that every part runs (CPU or GPU)")
    parser.add_argument("--budget", type=float, help="seconds for the whole suite (default: the sum of the parts' "
                        f"shares, {sum(s for s, _ in PARTS.values())} s on a GPU, {sum(s for _, s in PARTS.values())} "
                        "s with --smoke); shares scale with it")
    parser.add_argument("--parts", type=_part_list, default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--out", type=Path, help="folder for gpu_results.json/.md and suite.log (default: $OUT, "
                        "else the current folder)")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time diffusers compiled with mode='max-autotune' (minutes of autotuning)")
    # Internal: how the suite runs one part in a child process.
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    parser.add_argument("--part-budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return args


def _part_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown or text!r}; choose from {', '.join(PARTS)}")
    return [name for name in PARTS if name in names]  # always in the suite's order


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_part:
        return run_part(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"suite.py: error: no CUDA device (torch {torch.__version__} sees no GPU). Run it on a GPU machine "
              "(bash benchmarks/gpu/run.sh), or check the CPU path with --device cpu --smoke.", file=sys.stderr)
        return 2
    out_dir = args.out or Path(os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir / ".suite_work" if args.out else Path(os.environ.get("TMPDIR", "/tmp")) / "ddpm_hf_gpu_suite"
    work_dir.mkdir(parents=True, exist_ok=True)
    results = work_dir / "records.jsonl"
    results.unlink(missing_ok=True)

    shares = {name: PARTS[name][1 if args.smoke else 0] for name in args.parts}
    scale = (args.budget or sum(shares.values())) / sum(shares.values())
    shares = {name: share * scale for name, share in shares.items()}
    started = time.monotonic()
    log = (out_dir / "suite.log").open("w", encoding="utf-8")
    outcomes = {}
    allotted = 0.0
    for name, share in shares.items():
        allotted += share
        cap = allotted - (time.monotonic() - started)  # its share plus what earlier parts left
        outcomes[name] = run_child(args, name, cap, results, work_dir, log)
    log.close()

    records = read_records(results)
    suite = {"date": datetime.date.today().isoformat(), "device": args.device, "smoke": args.smoke,
             "budget_s": round(sum(shares.values())), "wall_s": round(time.monotonic() - started, 1),
             "parts": outcomes}
    summary = summarise(suite, records)
    (out_dir / "gpu_results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = render_markdown(summary)
    (out_dir / "gpu_results.md").write_text(markdown, encoding="utf-8")
    print("\n" + markdown)
    print(f"Wrote {out_dir / 'gpu_results.json'}, {out_dir / 'gpu_results.md'} and {out_dir / 'suite.log'}.")
    return 0 if all(outcome["status"] == "ok" for outcome in outcomes.values()) else 1


def read_records(results: Path) -> list[dict]:
    """The parts' records; a line cut short by a part killed mid-write is dropped."""
    records = []
    for line in results.read_text(encoding="utf-8").splitlines() if results.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def run_child(args: argparse.Namespace, name: str, cap: float, results: Path, work_dir: Path, log) -> dict:
    """Runs one part in its own process group, streaming its output to the console and the log; kills it (and
    whatever it started) `GRACE_S` seconds past its cap."""
    command = [sys.executable, str(Path(__file__).resolve()), "--run-part", name, "--part-budget", f"{cap:.1f}",
               "--results", str(results), "--work-dir", str(work_dir / name), "--device", args.device]
    command += ["--smoke"] * args.smoke + ["--max-autotune"] * args.max_autotune
    print(f"\n=== part {name}: {cap:.0f} s", flush=True)
    log.write(f"\n=== part {name}: {cap:.0f} s\n")
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def echo():
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(cap, 1) + GRACE_S[args.smoke])
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)  # the part and whatever it started (pytest, train.py)
        process.wait()
    reader.join(timeout=10)
    seconds = round(time.monotonic() - started, 1)
    if timed_out:
        status = "timeout"
        message = f"killed {GRACE_S[args.smoke]} s past its {cap:.0f} s cap; what it recorded before is kept"
    elif process.returncode == 0:
        status, message = "ok", ""
    else:
        status, message = "error", f"exit status {process.returncode}"
    if status != "ok":
        print(f"=== part {name}: {status} ({message})", flush=True)
    return {"status": status, "seconds": seconds, "cap_s": round(cap, 1), "message": message}


def run_part(args: argparse.Namespace) -> int:
    """In the child: runs one part; an exception is recorded as the part's error (exit 1)."""
    import traceback

    args.work_dir.mkdir(parents=True, exist_ok=True)
    environment = next((r for r in read_records(args.results) if r["kind"] == "environment"), {})
    ctx = PartContext(part=args.run_part, device=torch.device(args.device), smoke=args.smoke,
                      budget=Budget(args.part_budget), results_file=args.results, work_dir=args.work_dir,
                      environment=environment)
    module = importlib.import_module({"sampling": "sampling_speed", "training": "training_speed"}.get(
        args.run_part, args.run_part))
    try:
        if args.run_part == "sampling":
            module.run(ctx, max_autotune=args.max_autotune)
        else:
            module.run(ctx)
    except Exception as error:
        ctx.record("error", what=f"part {args.run_part}", error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc(limit=10)[-3000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
