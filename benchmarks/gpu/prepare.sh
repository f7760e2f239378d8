#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before lending a GPU: downloads the wheels of wheels.txt for CPython 3.12 on
# manylinux x86-64 into .whl/ at the repository root (git-ignored), which the device call carries.
# Idempotent: wheels already there are kept, wheels no longer pinned are deleted (one version of each).
set -euo pipefail
cd "$(dirname "$0")/../.."
requirements=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' benchmarks/gpu/wheels.txt)
mkdir -p .whl
# shellcheck disable=SC2086  # one word per requirement
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --dest .whl $requirements
python3 - "$requirements" <<'PY'
"""Delete the wheels of .whl/ that wheels.txt no longer pins, and check that each pin has exactly one wheel."""
import re, sys
from pathlib import Path

def normalise(name):
    return re.sub(r"[-_.]+", "_", name).lower()

pins = {normalise(line.split("==")[0]): line.split("==")[1] for line in sys.argv[1].split()}
for wheel in Path(".whl").glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if pins.get(normalise(name)) != version:
        print(f"prepare.sh: removing {wheel.name} (not pinned in wheels.txt)")
        wheel.unlink()
wheels = {normalise(w.name.split("-")[0]) for w in Path(".whl").glob("*.whl")}
missing = sorted(set(pins) - wheels)
if missing:
    sys.exit(f"prepare.sh: no wheel downloaded for {missing}")
size = sum(w.stat().st_size for w in Path(".whl").glob("*.whl")) / 2**20
print(f"prepare.sh: {len(wheels)} wheels in .whl/ ({size:.1f} MiB); carry it: carry=[\".whl\"]")
PY
