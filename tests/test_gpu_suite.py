"""The GPU suite (benchmarks/gpu/) runs end to end on the CPU, so that it works the first time it meets a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu" / "suite.py"


def run_suite(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("gpu_suite")
    # Three times the smoke budget: this checks that every part runs, and a busy CI machine runs them slower (the
    # budget's own logic is tested below). An idle machine leaves most of it unused.
    completed = run_suite("--device", "cpu", "--smoke", "--budget", "900", "--out", str(out), timeout=1500)
    results = json.loads((out / "gpu_results.json").read_text()) if (out / "gpu_results.json").is_file() else {}
    markdown = (out / "gpu_results.md").read_text() if (out / "gpu_results.md").is_file() else ""
    return completed, results, markdown


def test_smoke_run_runs_every_part(smoke):
    completed, results, markdown = smoke
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert {name: part["status"] for name, part in results["suite"]["parts"].items()} == dict.fromkeys(
        ["environment", "correctness", "real_run", "sampling", "training"], "ok")
    assert results["errors"] == []
    # Only torch.compile is left out on a CPU, and the report says so.
    assert {skip["reason"] for skip in results["skipped"]} == {"--smoke: compiling takes minutes on a CPU"}
    assert "Not measured:" in markdown and markdown in completed.stdout


def test_smoke_run_measures_what_the_gpu_run_measures(smoke):
    _, results, _ = smoke
    records = results["records"]
    kinds = lambda kind: [r for r in records if r["kind"] == kind]  # noqa: E731
    environment = results["environment"]
    assert environment["torch"] == torch.__version__ and environment["bf16_matmul_tflops"] > 0
    assert environment["unmet_requirements"] == []

    tests = kinds("tests_summary")[0]
    assert tests["passed"] >= 5 and tests["failed"] == tests["error"] == 0
    assert any("test_unet_matches_diffusers" in name for name in tests["passed_names"])

    sampling = kinds("sampling")
    assert {(r["batch"], r["contender"]) for r in sampling} == {
        (batch, name) for batch in (2, 4)
        for name in ("ddpm_hf-fp32-eager", "ddpm_hf-best", "diffusers-fp32-eager", "diffusers-best")}
    assert all(r["images_per_s_1000_steps"] > 0 and r["mfu"] > 0 for r in sampling)
    comparisons = kinds("sampling_comparison")
    assert len(comparisons) == 2 and all(c["fp32_max_abs_diff"] < 1e-4 and c["fast_speedup"] > 0 for c in comparisons)

    training = kinds("training")
    assert [(r["batch"], r["mode"]) for r in training] == [(4, "bf16"), (4, "fp32+tf32"), (8, "bf16")]
    assert all(r["ddpm_hf_images_per_s"] > 0 and r["diffusers_images_per_s"] > 0 for r in training)

    real_run = kinds("real_run")[0]
    assert real_run["ok"], real_run
    assert real_run["loss_falls"] and real_run["loads_in_diffusers"] is True
    assert real_run["steps"] == real_run["stopped_at"] + 10


def test_the_report_is_a_readme_table(smoke):
    _, results, markdown = smoke
    assert markdown.startswith("### GPU suite: CPU")
    assert "| target | measured | threshold | met |" in markdown
    assert "| ddpm_hf `enable_fast_sampling()` | 4 |" in markdown
    assert "| bf16 | 8 |" in markdown and "Real run (`examples/train.py --mixed_precision bf16`): **ok**" in markdown
    assert len(results["targets"]) == 6 and all(t["met"] is None for t in results["targets"])  # tiny configs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_suite_refuses_in_one_line(tmp_path):
    completed = run_suite("--out", str(tmp_path), timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "no CUDA device" in completed.stderr
    assert "--device cpu --smoke" in completed.stderr and not list(tmp_path.iterdir())


def test_a_part_past_its_cap_is_killed_and_reported(tmp_path):
    completed = run_suite("--device", "cpu", "--smoke", "--parts", "real_run", "--budget", "1", "--out",
                          str(tmp_path), timeout=120)
    assert completed.returncode == 1
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    part = results["suite"]["parts"]["real_run"]
    assert part["status"] == "timeout" and part["seconds"] < 30
    assert "real_run: timeout (killed 5 s past its 1 s cap" in (tmp_path / "gpu_results.md").read_text()


def test_a_failing_part_records_its_error(tmp_path):
    """A part that raises (here: the training part asked for a GPU on a machine without one) records the error and
    exits 1; the suite records the part's status and goes on."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to fail for real")
    results = tmp_path / "records.jsonl"
    completed = run_suite("--run-part", "training", "--part-budget", "60", "--results", str(results), "--work-dir",
                          str(tmp_path / "work"), "--device", "cuda", "--smoke", timeout=120)
    assert completed.returncode == 0, completed.stderr  # each row's error is caught: the part itself finished
    records = [json.loads(line) for line in results.read_text().splitlines()]
    errors = [record for record in records if record["kind"] == "error"]
    assert [e["what"] for e in errors] == ["training batch 4 bf16", "training batch 4 fp32+tf32", "training batch 8 bf16"]
    assert all(re.search(r"CUDA|cuda|NVIDIA", e["error"]) for e in errors)


@pytest.mark.parametrize("args, message", [
    (["--parts", "sampling,bogus"], "unknown part(s) ['bogus']; choose from environment, correctness"),
    (["--budget", "0"], "--budget must be a positive number of seconds, got 0.0"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    completed = run_suite(*args, timeout=60)
    assert completed.returncode == 2 and message in completed.stderr


def test_wheels_are_pinned_once_each():
    lines = [line.split("#")[0].strip() for line in (REPO / "benchmarks/gpu/wheels.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    names = [re.sub(r"[-_.]+", "_", pin.split("==")[0]).lower() for pin in pins]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", pin) for pin in pins), pins
    assert len(names) == len(set(names)) and {"diffusers", "datasets"} <= set(names)
