#!/usr/bin/env bash
# Run THERE, on the device machine, from the repository root:
#   device run: command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=600
# Installs the wheels that prepare.sh downloaded into /tmp/site (nothing can be downloaded there), puts them and
# the working tree's ddpm_hf first on the path, and runs the suite; its results land in $OUT. Extra arguments go to
# suite.py (e.g. `--parts sampling,training` or `--budget 300`).
set -uo pipefail
cd "$(dirname "$0")/../.."
if ! compgen -G ".whl/*.whl" >/dev/null; then
  echo "run.sh: no wheels in .whl/: run benchmarks/gpu/prepare.sh first and name .whl in the call's carry" >&2
  exit 2
fi
started=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "run.sh: installing the carried wheels failed" >&2; exit 3; }
echo "run.sh: installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site in $(( $(date +%s) - started )) s"
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec python3 benchmarks/gpu/suite.py "$@"
