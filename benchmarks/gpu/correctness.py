"""Part 2: the tests marked `cuda` (tests/test_cuda.py and the CUDA tests elsewhere), run with pytest.

On a GPU they check ddpm_hf against diffusers on CUDA (UNet at fp32/bf16/fp16, the scheduler step and the whole
pipeline with a seeded CUDA generator), the CUDA-graph step (same images as the eager loop, no host sync while
replaying), low-precision training steps and fused AdamW. On a CPU only their CPU variants run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from context import PartContext

REPO = Path(__file__).resolve().parents[2]


def run(ctx: PartContext) -> None:
    report = ctx.work_dir / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "-rfE",
               "--continue-on-collection-errors", f"--junitxml={report}", "tests"]
    timeout = max(ctx.budget.left() - 5, 10)
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    try:
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                   env={**os.environ, "PYTHONPATH": python_path})
        exit_code, output = completed.returncode, completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as expired:
        exit_code, output = None, _text(expired.stdout) + _text(expired.stderr)
        ctx.skip("the remaining cuda tests", f"pytest ran past the part's budget ({timeout:.0f} s)")
    # The XML is written at the end only; a run cut short still printed each finished test's outcome.
    cases = parse_junit(report) if report.is_file() else parse_verbose(output)
    for case in cases:
        if case["outcome"] != "passed":
            ctx.record("test", **case)
    counts = {outcome: sum(case["outcome"] == outcome for case in cases)
              for outcome in ("passed", "failed", "error", "skipped")}
    passed = [case["name"] for case in cases if case["outcome"] == "passed"]
    ctx.record("tests_summary", exit_code=exit_code, **counts, passed_names=passed, output_tail=output[-1500:])


def parse_junit(path: Path) -> list[dict[str, str]]:
    """One dict per test case of a pytest JUnit XML report: its name, outcome and, unless passed, the message."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".removeprefix("tests.")
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                lines = (child.get("message") or child.text or "").strip().splitlines()
                message = lines[0][:300] if lines else ""
                break
        cases.append({"name": name, "outcome": outcome, "message": message, "seconds": float(case.get("time", 0))})
    return cases


def parse_verbose(output: str) -> list[dict[str, str]]:
    """The outcomes `pytest -v` printed, one dict per test case (no messages)."""
    outcomes = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}
    cases = []
    for match in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", output, re.MULTILINE):
        name = match.group(1).removeprefix("tests/").replace(".py::", "::").replace("/", ".")
        cases.append({"name": name, "outcome": outcomes[match.group(2)], "message": "", "seconds": 0.0})
    return cases


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""
